"""serving.decoding: one TorchServe request -> model input, or the right RequestRejected.

Every image test compares against the plain 8-bit greyscale PNG of the same synthetic digit (white anti-aliased
ink on black, asymmetric so that flips and rotations show), decoded to `REF` = pixels / 255. The TorchServe
section feeds frames through TorchServe's own worker-side decoding (`ts.protocol.otf_message_handler`,
`ts.service`) to pin down what a handler really receives.
"""
from __future__ import annotations

import io
import json
import math
import re
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.decoding import (
    FORM_URLENCODED_HINT,
    BodyFormat,
    DecodedInput,
    InputLimits,
    InputSpec,
    Protocol,
    V2_OUTPUT_NAME,
    decode_image,
    decode_request,
    derive_limits,
    header_value,
    image_to_array,
    v2_outputs,
)
from serving.rejections import HTTP_PHRASES, MAX_MESSAGE_CHARS, RejectReason, RequestRejected

ORIENTATION = 0x0112  # EXIF tag
SPEC = InputSpec((1, 28, 28))
SPEC_RGB = InputSpec((3, 28, 28))
REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|Traceback|\bb'|\bb\"|bytearray\(|\\x[0-9a-f]{2}")


# ------------------------------------------------------------------------------------------------------ helpers
def _segment_distance(yy: np.ndarray, xx: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    (ay, ax), (by, bx) = a, b
    dy, dx = by - ay, bx - ax
    t = np.clip(((yy - ay) * dy + (xx - ax) * dx) / (dy * dy + dx * dx), 0.0, 1.0)
    return np.hypot(yy - (ay + t * dy), xx - (ax + t * dx))


def make_digit(height: int = 28, width: int = 28) -> np.ndarray:
    """H x W uint8: an anti-aliased white "7" on black (many grey levels, no symmetry)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    top = _segment_distance(yy, xx, (0.2 * height, 0.2 * width), (0.2 * height, 0.8 * width))
    stem = _segment_distance(yy, xx, (0.2 * height, 0.8 * width), (0.85 * height, 0.35 * width))
    ink = np.clip(1.6 - np.minimum(top, stem) / 1.1, 0.0, 1.0)
    return np.round(ink * 255.0).astype(np.uint8)


INK = make_digit()
REF = (INK.astype(np.float32) / np.float32(255))[None]  # what the plain L PNG must decode to
UNUSED_GREY = int(np.setdiff1d(np.arange(1, 255), INK)[0])  # a grey level the digit never uses: a safe tRNS key


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def grey_png(ink: np.ndarray = INK, **options: Any) -> bytes:
    return encode(Image.fromarray(ink), "PNG", **options)


def decode(body: Any, content_type: str | None = None, spec: InputSpec = SPEC) -> DecodedInput:
    """decode_request on a raw body, the way TorchServe hands one over ({"body": ...})."""
    headers = {"Content-Type": content_type} if content_type else {}
    return decode_request({"body": body}, headers, spec)


def rejected(body: Any = None, content_type: str | None = None, spec: InputSpec = SPEC, *, row: Any = None,
             headers: dict[str, Any] | None = None) -> RequestRejected:
    """The RequestRejected a request raises; also checks the message is short and free of reprs."""
    if row is None:
        row = {"body": body}
    if headers is None:
        headers = {"Content-Type": content_type} if content_type else {}
    with pytest.raises(RequestRejected) as info:
        decode_request(row, headers, spec)
    error = info.value
    assert len(error.message) <= MAX_MESSAGE_CHARS
    assert not REPR.search(error.message), error.message
    assert error.body()["status"] == error.reason.status
    return error


def json_body(document: Any) -> bytes:
    return json.dumps(document).encode("utf-8")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(rows: list[bytes], width: int, height: int, bit_depth: int, colour_type: int, extra: bytes = b"") -> bytes:
    """A PNG written by hand (for bit depths Pillow does not write): rows of packed samples, filter 0."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\0" + row for row in rows))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))


# ------------------------------------------------- images as viewers show them; JSON and multipart edge cases
def test_jpeg_upside_down_with_exif_orientation_3_decodes_upright() -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 3
    stored = Image.fromarray(np.ascontiguousarray(INK[::-1, ::-1]))
    x = decode(encode(stored, "JPEG", quality=95, exif=exif)).x
    ignored = decode(encode(stored, "JPEG", quality=95)).x  # the same pixels without the tag
    upright_error = float(np.abs(x - REF).mean())
    assert upright_error < 0.02
    assert float(np.abs(x - REF[:, ::-1, ::-1]).mean()) > 5 * upright_error
    assert float(np.abs(ignored - REF[:, ::-1, ::-1]).mean()) < 0.02  # the test is not vacuous


def test_sixteen_bit_grey_png_equals_the_eight_bit_png() -> None:
    sixteen = Image.fromarray(INK.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    x = decode(encode(sixteen)).x
    np.testing.assert_array_equal(x, decode(grey_png()).x)
    np.testing.assert_array_equal(x, REF)


def test_rgba_white_ink_over_stored_white_decodes_white_on_black() -> None:
    rgba = np.full((*INK.shape, 4), 255, dtype=np.uint8)
    rgba[..., 3] = INK  # ink = alpha; the fully transparent pixels are stored white
    body = encode(Image.fromarray(rgba))
    np.testing.assert_array_equal(decode(body).x, REF)
    np.testing.assert_array_equal(decode(body, spec=SPEC_RGB).x, np.repeat(REF, 3, axis=0))
    on_white = decode(body, spec=InputSpec((1, 28, 28), background=1.0)).x
    np.testing.assert_array_equal(on_white, np.ones_like(REF))


@pytest.mark.parametrize("digits", [40, 400, 5000])
def test_huge_integer_literal_is_out_of_range(digits: int) -> None:
    cells = [[0.0] * 28 for _ in range(28)]
    body = json_body({"data": [cells]}).replace(b"0.0", b"1" * digits, 1)
    error = rejected(body, "application/json")
    assert error.reason in (RejectReason.OUT_OF_RANGE, RejectReason.BAD_JSON)
    assert error.reason is RejectReason.OUT_OF_RANGE and error.reason.status == 400
    assert f"{digits} digits" in error.message


def test_json_with_utf8_bom_is_accepted() -> None:
    body = b"\xef\xbb\xbf" + json_body({"data": REF.tolist()})
    decoded = decode(body, "application/json")
    np.testing.assert_array_equal(decoded.x, REF)
    assert decoded.protocol is Protocol.RAW
    np.testing.assert_array_equal(decode(body.decode("utf-8"), "text/plain").x, REF)  # a text/* body: str


def test_multipart_with_two_fields_is_rejected() -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=----x"}
    error = rejected(row={"data": grey_png(), "other": grey_png()}, headers=headers)
    assert error.reason is RejectReason.TOO_MANY_INPUTS
    assert error.reason.status == 400
    assert "exactly one input per request is accepted" in error.message
    assert error.body()["fields"] == 2


# ----------------------------------------------------------------------------------------------- request shapes
def test_multipart_with_one_field_of_any_name_is_accepted() -> None:
    headers = {"content-type": "multipart/form-data; boundary=----x"}
    np.testing.assert_array_equal(decode_request({"file": grey_png()}, headers, SPEC).x, REF)


def test_query_parameters_next_to_the_body_are_ignored() -> None:
    row = {"model_name": b"toy", "body": bytearray(grey_png())}  # legacy /invocations?model_name=toy
    np.testing.assert_array_equal(decode_request(row, {"Content-Type": "image/png"}, SPEC).x, REF)


def test_a_bare_payload_is_accepted() -> None:
    np.testing.assert_array_equal(decode_request(grey_png(), {}, SPEC).x, REF)
    np.testing.assert_array_equal(decode_image(grey_png(), SPEC), REF)


@pytest.mark.parametrize("spelling", ["Content-Type", "content-type", "CONTENT-TYPE"])
def test_form_urlencoded_is_415_whatever_the_header_case(spelling: str) -> None:
    error = rejected(row={"data": b"x"}, headers={spelling: "application/x-www-form-urlencoded; charset=utf-8"})
    assert error.reason is RejectReason.UNSUPPORTED_CONTENT_TYPE
    assert error.body() == {"error": FORM_URLENCODED_HINT, "reason": "unsupported_content_type", "status": 415}


def test_header_value_ignores_torchserve_parameter_entries() -> None:
    headers = {"body": {"content-type": "image/png"}, "Content-Type": "image/png", "X-Compute-Budget": "3"}
    assert header_value(headers, "content-type") == "image/png"
    assert header_value(headers, "x-compute-budget") == "3"
    assert header_value(headers, "body") is None
    assert header_value(None, "content-type") is None


@pytest.mark.parametrize("row", [{"body": b""}, {"body": b" \r\n\t"}, {"body": b"\xef\xbb\xbf "}, {"body": None},
                                 {"body": ""}, {}])
def test_empty_bodies(row: dict[str, Any]) -> None:
    assert rejected(row=row).reason is RejectReason.EMPTY_BODY


def test_payload_over_the_limit_is_413() -> None:
    spec = InputSpec((1, 28, 28), max_payload_bytes=100)
    error = rejected(grey_png(), "image/png", spec)
    assert error.reason is RejectReason.PAYLOAD_TOO_LARGE and error.reason.status == 413
    assert error.body()["max_payload_bytes"] == 100
    assert rejected("{" + " " * 200 + "}", "text/plain", spec).reason is RejectReason.PAYLOAD_TOO_LARGE


def test_unexpected_payload_types_are_not_swallowed() -> None:
    with pytest.raises(TypeError):
        decode_request({"body": object()}, {}, SPEC)


# ------------------------------------------------------------------------------------------------------- JSON
def test_json_chw_and_batched_chw_are_accepted() -> None:
    for data in (REF.tolist(), REF[None].tolist()):
        decoded = decode(json_body({"data": data}), "application/json")
        np.testing.assert_array_equal(decoded.x, REF)
        assert decoded.x.dtype == np.float32 and decoded.x.flags.c_contiguous
    assert decode({"data": REF.tolist()}).x.shape == (1, 28, 28)  # already parsed by TorchServe


def test_json_integers_zero_and_one_are_numbers() -> None:
    data = np.zeros((1, 28, 28), dtype=int)
    data[0, 0, 0] = 1
    assert decode(json_body({"data": data.tolist()})).x[0, 0, 0] == 1.0


@pytest.mark.parametrize(
    "document, reason",
    [
        ({"data": [[[0.5] * 28] * 27]}, RejectReason.WRONG_SHAPE),
        ({"data": [[[0.5] * 28] * 28] * 2}, RejectReason.WRONG_SHAPE),
        ({"data": [[[0.5] * 28] * 27 + [[0.5] * 27]]}, RejectReason.WRONG_SHAPE),  # ragged
        ({"data": [[[0.5] * 27 + [[0.5]]] * 28]}, RejectReason.WRONG_SHAPE),  # ragged depth
        ({"data": [[["0.5"] * 28] * 28]}, RejectReason.BAD_JSON),
        ({"data": [[[True] * 28] * 28]}, RejectReason.BAD_JSON),
        ({"data": [[[None] * 28] * 28]}, RejectReason.BAD_JSON),
        ({"data": [[[{}] * 28] * 28]}, RejectReason.BAD_JSON),
        ({"data": "abc"}, RejectReason.BAD_JSON),
        ({"data": 0.5}, RejectReason.BAD_JSON),
        ({"pixels": []}, RejectReason.BAD_JSON),
        ({"data": [], "inputs": []}, RejectReason.BAD_JSON),
        ([[[0.5] * 28] * 28], RejectReason.BAD_JSON),
        ({"data": [[[1.5] * 28] * 28]}, RejectReason.OUT_OF_RANGE),
        ({"data": [[[-0.25] * 28] * 28]}, RejectReason.OUT_OF_RANGE),
    ],
)
def test_json_rules(document: Any, reason: RejectReason) -> None:
    assert rejected(json_body(document), "application/json").reason is reason
    assert rejected(row={"body": document}).reason is reason  # the same document parsed by TorchServe


def _nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [5, 33, 50, 900])
def test_json_nested_deeper_than_the_input_rank_is_a_400(depth: int) -> None:
    for document in ({"data": _nested(0.5, depth)}, v2_request(_nested(0.5, depth))):
        for error in (rejected(json_body(document), "application/json"), rejected(row={"body": document})):
            assert error.reason is RejectReason.WRONG_SHAPE and error.reason.status == 400
            assert "nested deeper than 4 lists" in error.message


def test_json_with_many_short_numbers_is_refused_before_it_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"data": [' + b",".join([b"0"] * 5000) + b"]}"  # within the byte limit: 10 kB
    assert len(body) < SPEC.limits.json_bytes
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed"))
    error = rejected(body, "application/json")
    assert error.reason is RejectReason.WRONG_SHAPE and "5000 values" in error.message
    names = json_body(v2_request(id="," * 256) | {"inputs": [{**v2_request()["inputs"][0], "name": "," * 256}]})
    monkeypatch.undo()
    assert decode(names).request_id == "," * 256  # commas inside the longest strings still fit


def test_json_with_more_values_than_the_input_is_refused_before_numpy_sees_it() -> None:
    huge = {"data": [[[0.5] * 28] * 28] * 5000}  # as TorchServe would hand over a parsed body: no byte limit
    error = rejected(row={"body": huge})
    assert error.reason is RejectReason.WRONG_SHAPE and "more than the 784 values" in error.message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_json_non_finite_literals(literal: bytes) -> None:
    body = json_body({"data": REF.tolist()}).replace(b"0.0", literal, 1)
    error = rejected(body)
    assert error.reason is RejectReason.NON_FINITE and "1 NaN or infinite" in error.message


@pytest.mark.parametrize("literal", [b"1e39", b"-3.5e38", b"1e400", b"1" + b"0" * 400 + b".5"])
def test_json_numbers_beyond_float32_are_out_of_range(literal: bytes) -> None:
    body = json_body({"data": REF.tolist()}).replace(b"0.0", literal, 1)
    error = rejected(body)
    assert error.reason is RejectReason.OUT_OF_RANGE and "float32" in error.message


def test_json_tiny_numbers_underflow_to_zero() -> None:
    body = json_body({"data": REF.tolist()}).replace(b"0.0", b"1e-60", 1)
    assert decode(body).x[0, 0, 0] == 0.0


def test_parsed_document_with_huge_integer_is_out_of_range() -> None:
    data = np.zeros((1, 28, 28)).tolist()
    data[0][0][0] = 10**400  # TorchServe's json.loads keeps ints up to 4300 digits
    assert rejected(row={"body": {"data": data}}).reason is RejectReason.OUT_OF_RANGE


@pytest.mark.parametrize("body", [b"{\"data\": [", b"{'data': []}", b"[" * 30_000, b"\xff\xfe{}", b"{\"data\": 1} x"])
def test_malformed_json_is_bad_json(body: bytes) -> None:
    error = rejected(body, "application/json")
    assert error.reason is RejectReason.BAD_JSON


def test_json_content_type_with_non_json_text_is_bad_json() -> None:
    assert rejected(b"hello", "application/json").reason is RejectReason.BAD_JSON
    assert rejected("hello", "text/plain").reason is RejectReason.BAD_JSON


# ------------------------------------------------------------------------------------- Open Inference Protocol v2
def v2_request(data: Any = None, shape: Any = (1, 1, 28, 28), datatype: Any = "FP32", **extra: Any) -> dict:
    tensor = {"name": "input-0", "shape": list(shape), "datatype": datatype,
              "data": REF.ravel().tolist() if data is None else data}
    return {"inputs": [tensor], **extra}


@pytest.mark.parametrize("shape, data", [((1, 1, 28, 28), None), ((1, 28, 28), None),
                                         ((1, 1, 28, 28), REF[None].tolist()), ((1, 28, 28), REF.tolist())])
def test_v2_request_flat_or_nested(shape: tuple[int, ...], data: Any) -> None:
    decoded = decode(json_body(v2_request(data, shape, id="req-7")), "application/json")
    np.testing.assert_array_equal(decoded.x, REF)
    assert decoded.protocol is Protocol.OPEN_INFERENCE_V2
    assert (decoded.input_name, decoded.request_id) == ("input-0", "req-7")
    assert decode(v2_request(data, shape)).request_id is None  # parsed by TorchServe, no id


def test_v2_fp64_is_accepted() -> None:
    np.testing.assert_array_equal(decode(v2_request(datatype="FP64")).x, REF)


@pytest.mark.parametrize(
    "document, reason",
    [
        (v2_request(datatype="INT8"), RejectReason.UNSUPPORTED_DATATYPE),
        (v2_request(datatype="BYTES"), RejectReason.UNSUPPORTED_DATATYPE),
        (v2_request(datatype=None), RejectReason.UNSUPPORTED_DATATYPE),
        (v2_request(datatype=["FP32"]), RejectReason.UNSUPPORTED_DATATYPE),
        ({"inputs": v2_request()["inputs"] * 2}, RejectReason.TOO_MANY_INPUTS),
        ({"inputs": []}, RejectReason.BAD_JSON),
        ({"inputs": {"name": "x"}}, RejectReason.BAD_JSON),
        ({"inputs": ["x"]}, RejectReason.BAD_JSON),
        (v2_request(shape=(1, 1, 28, 27)), RejectReason.WRONG_SHAPE),
        (v2_request(shape=(784,)), RejectReason.WRONG_SHAPE),
        (v2_request(shape=(1, 1, 28, "28")), RejectReason.BAD_JSON),
        (v2_request(shape=(1, True, 28, 28)), RejectReason.BAD_JSON),
        (v2_request(data=REF.ravel().tolist()[:-1]), RejectReason.WRONG_SHAPE),
        (v2_request(data=REF.tolist(), shape=(1, 1, 28, 28)), RejectReason.WRONG_SHAPE),  # nesting disagrees
        (v2_request(data=[2.0] * 784), RejectReason.OUT_OF_RANGE),
        (v2_request(data=[math.nan] * 784), RejectReason.NON_FINITE),
        (v2_request(data=["0"] * 784), RejectReason.BAD_JSON),
        (v2_request(id=7), RejectReason.BAD_JSON),
        (v2_request(id="x" * 1000), RejectReason.BAD_JSON),
        ({"inputs": [{k: v for k, v in v2_request()["inputs"][0].items() if k != "name"}]}, RejectReason.BAD_JSON),
        ({"inputs": [{k: v for k, v in v2_request()["inputs"][0].items() if k != "data"}]}, RejectReason.BAD_JSON),
    ],
)
def test_v2_rules(document: dict, reason: RejectReason) -> None:
    assert rejected(row={"body": document}).reason is reason


def test_v2_outputs_shape_and_json() -> None:
    probs = np.array([0.1, 0.7, 0.2], dtype=np.float32)
    body = v2_outputs(V2_OUTPUT_NAME, probs)
    assert body == v2_outputs(V2_OUTPUT_NAME, probs[None])
    (output,) = body["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [1, 3] and output["datatype"] == "FP32"
    np.testing.assert_array_equal(np.asarray(output["data"], dtype=np.float32), probs)
    json.dumps(body)
    with pytest.raises(ValueError):
        v2_outputs("p", np.zeros((2, 3)))


# ----------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_exif_orientations_decode_upright_exactly(orientation: int) -> None:
    upright = make_digit(20, 28)
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}
    stored = Image.fromarray(upright)
    if orientation in inverse:
        stored = stored.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    x = decode(encode(stored, exif=exif), spec=InputSpec((1, 20, 28))).x
    np.testing.assert_array_equal(x, (upright.astype(np.float32) / np.float32(255))[None])


def _palette_image(ink: np.ndarray, white: int | None = None) -> Image.Image:
    """P image with Pillow's grey palette (index = grey level); entry `white` recoloured white."""
    image = Image.fromarray(ink).convert("P")
    assert np.array_equal(np.asarray(image.convert("L")), ink)
    if white is not None:
        palette = image.getpalette()
        palette[3 * white: 3 * white + 3] = [255, 255, 255]
        image.putpalette(palette)
    return image


def test_lossless_modes_decode_exactly_like_the_grey_png() -> None:
    key_bg = np.where(INK == 0, UNUSED_GREY, INK).astype(np.uint8)  # background stored as the key grey
    white_la = np.stack([np.full_like(INK, 255), INK], axis=-1)  # white ink, alpha = ink
    grey_rgb = np.repeat(INK[..., None], 3, axis=-1)
    magenta_bg = grey_rgb.copy()
    magenta_bg[INK == 0] = (255, 0, 255)
    palette = _palette_image(np.where(INK == 0, UNUSED_GREY, INK).astype(np.uint8), white=UNUSED_GREY)
    bodies = {
        "L": grey_png(),
        "L+tRNS": grey_png(key_bg, transparency=UNUSED_GREY),
        "LA": encode(Image.fromarray(white_la)),
        "P": encode(_palette_image(INK)),
        "P+tRNS": encode(palette, transparency=UNUSED_GREY),  # transparent entry stored white
        "RGB": encode(Image.fromarray(grey_rgb)),
        "RGB+tRNS": encode(Image.fromarray(magenta_bg), transparency=(255, 0, 255)),
        "I;16+tRNS": encode(Image.fromarray(key_bg.astype(np.uint16) * 257), transparency=UNUSED_GREY * 257),
    }
    for name, body in bodies.items():
        np.testing.assert_array_equal(decode(body).x, REF, err_msg=name)
        np.testing.assert_array_equal(decode(body, spec=SPEC_RGB).x, np.repeat(REF, 3, axis=0), err_msg=name)


def test_palette_alpha_per_entry_is_composited() -> None:
    image = _palette_image(np.full_like(INK, 255))
    x = decode(encode(image, transparency=bytes(range(256)))).x  # index i has alpha i: white at alpha 255
    np.testing.assert_array_equal(x, np.ones_like(REF))
    inked = _palette_image(np.where(INK == 0, UNUSED_GREY, INK).astype(np.uint8), white=UNUSED_GREY)
    alphas = bytes(0 if i == UNUSED_GREY else 255 for i in range(256))  # one transparent entry, stored white
    np.testing.assert_array_equal(decode(encode(inked, transparency=alphas)).x, REF)


def test_one_bit_png_with_and_without_transparency() -> None:
    bits = Image.fromarray(np.where(INK > 127, 255, 0).astype(np.uint8)).convert("1")
    expected = (INK > 127).astype(np.float32)[None]
    np.testing.assert_array_equal(decode(encode(bits)).x, expected)
    inverted = Image.fromarray(np.where(INK > 127, 0, 255).astype(np.uint8)).convert("1")
    spec = InputSpec((1, 28, 28), background=0.25)
    x = decode(encode(inverted, transparency=1), spec=spec).x  # white is transparent -> 0.25, black ink stays 0
    np.testing.assert_array_equal(x, np.where(INK > 127, 0.0, 0.25).astype(np.float32)[None])


def test_two_bit_grey_png_transparency_key_is_honoured() -> None:
    # Pillow scales 2-bit pixels to 0..255 (x85) but keeps the tRNS key in file units.
    row = bytes([0b00011011])  # samples 0, 1, 2, 3
    body = raw_png([row], 4, 1, 2, 0, png_chunk(b"tRNS", struct.pack(">H", 1)))
    x = decode(body, spec=InputSpec((1, 1, 4), background=0.0)).x
    np.testing.assert_allclose(x, [[[0.0, 0.0, 170 / 255, 1.0]]], rtol=0, atol=1e-7)


def test_sixteen_bit_rgb_png_with_transparency_key() -> None:
    samples = struct.pack(">6H", 0x8080, 0x8080, 0x8080, 0xFFFF, 0x0000, 0x0180)
    body = raw_png([samples], 2, 1, 16, 2, png_chunk(b"tRNS", struct.pack(">3H", 0xFFFF, 0x0000, 0x0180)))
    x = decode(body, spec=InputSpec((3, 1, 2), background=0.5)).x
    np.testing.assert_allclose(x[:, 0, 0], [128 / 255] * 3, atol=1e-7)  # Pillow keeps the high byte
    np.testing.assert_allclose(x[:, 0, 1], [0.5] * 3, atol=1e-7)  # the key colour is transparent


def test_sixteen_bit_grey_alpha_png_is_decoded() -> None:
    samples = struct.pack(">4H", 0xFFFF, 0x8080, 0xFFFF, 0x0000)  # (grey, alpha) x 2
    body = raw_png([samples], 2, 1, 16, 4)
    x = decode(body, spec=InputSpec((1, 1, 2))).x
    np.testing.assert_allclose(x[0, 0], [128 / 255, 0.0], atol=1 / 255)


def test_rgb_becomes_pillow_luma_and_keeps_colour_for_three_channels() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    grey = np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255)
    np.testing.assert_array_equal(decode(encode(image)).x, grey[None])
    np.testing.assert_array_equal(decode(encode(image), spec=SPEC_RGB).x,
                                  (rgb.astype(np.float32) / np.float32(255)).transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes_decode_close_to_the_grey_png(mode: str) -> None:
    image = Image.fromarray(INK).convert(mode) if mode != "CMYK" else Image.fromarray(INK).convert("RGB").convert(mode)
    x = decode(encode(image, "JPEG", quality=95)).x
    assert float(np.abs(x - REF).mean()) < 0.02


def test_large_image_is_resized_bilinear() -> None:
    big = make_digit(84, 56)  # shorter side 56 -> 28 (84 -> 42), then the centre 28 rows: 7..34
    shorter = Image.fromarray(big).resize((28, 42), Image.Resampling.BILINEAR)
    expected = np.asarray(shorter.crop((0, 7, 28, 35)), dtype=np.float32) / 255
    np.testing.assert_array_equal(decode(grey_png(big)).x, expected[None])
    sixteen = decode(encode(Image.fromarray(big.astype(np.uint16) * 257))).x  # float path: same up to rounding
    np.testing.assert_allclose(sixteen, expected[None], atol=1 / 255)
    huge = make_digit(280, 280)
    jpeg = decode(encode(Image.fromarray(huge), "JPEG", quality=95)).x  # draft-scaled decode (1/8), then bilinear
    full = np.asarray(Image.fromarray(huge).resize((28, 28), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    assert jpeg.shape == (1, 28, 28) and float(np.abs(jpeg - full[None]).mean()) < 0.02


def test_background_fills_fully_transparent_images() -> None:
    clear = np.zeros((28, 28, 2), dtype=np.uint8)
    x = decode(encode(Image.fromarray(clear)), spec=InputSpec((3, 28, 28), background=0.5)).x
    np.testing.assert_array_equal(x, np.full((3, 28, 28), 0.5, dtype=np.float32))


@pytest.mark.parametrize("mode", ["La", "RGBa", "PA", "RGBX", "HSV", "YCbCr", "CMYK", "I;16B", "I;16L"])
def test_in_memory_modes_decode(mode: str) -> None:
    if mode.startswith("I;16"):
        order = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (28, 28), (INK.astype(order) * 257).tobytes())
    else:
        source = {"La": "LA", "RGBa": "RGBA", "PA": "P"}.get(mode, "RGB")
        image = Image.fromarray(INK).convert(source).convert(mode)
    x = image_to_array(image, SPEC)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    if mode in ("La", "RGBa", "PA", "RGBX", "I;16B", "I;16L"):
        np.testing.assert_allclose(x, REF, atol=1 / 255)


def test_mode_i_is_read_as_sixteen_bit_and_f_as_unit_range() -> None:
    as_i = Image.fromarray(INK.astype(np.int32) * 257)
    assert as_i.mode == "I"
    np.testing.assert_array_equal(image_to_array(as_i, SPEC), REF)
    as_f = Image.fromarray(INK.astype(np.float32) / np.float32(255))
    assert as_f.mode == "F"
    np.testing.assert_array_equal(image_to_array(as_f, SPEC), REF)


@pytest.mark.parametrize(
    "image, reason",
    [
        (Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)), RejectReason.UNSUPPORTED_IMAGE_MODE),
        (Image.fromarray(np.full((4, 4), -1, dtype=np.int32)), RejectReason.UNSUPPORTED_IMAGE_MODE),
        (Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32)), RejectReason.OUT_OF_RANGE),
        (Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)), RejectReason.NON_FINITE),
        (Image.new("LAB", (4, 4)), RejectReason.UNSUPPORTED_IMAGE_MODE),
        (Image.new("L", (0, 4)), RejectReason.UNDECODABLE_IMAGE),
    ],
)
def test_modes_that_cannot_be_honoured(image: Image.Image, reason: RejectReason) -> None:
    with pytest.raises(RequestRejected) as info:
        image_to_array(image, SPEC)
    assert info.value.reason is reason
    assert not REPR.search(info.value.message)


def test_malformed_transparency_key_is_a_clear_4xx() -> None:
    image = Image.fromarray(INK)
    image.info["transparency"] = b"\x00\x01"
    with pytest.raises(RequestRejected) as info:
        image_to_array(image, SPEC)
    assert info.value.reason is RejectReason.UNSUPPORTED_IMAGE_MODE


def test_images_need_one_or_three_channels() -> None:
    spec = InputSpec((2, 28, 28))
    assert rejected(grey_png(), "image/png", spec).reason is RejectReason.UNSUPPORTED_IMAGE_MODE
    assert decode(json_body({"data": np.zeros((2, 28, 28)).tolist()}), spec=spec).x.shape == (2, 28, 28)


def test_pixel_limit_is_413_before_decoding() -> None:
    spec = InputSpec((1, 28, 28), max_image_pixels=28 * 28 - 1)
    error = rejected(grey_png(), "image/png", spec)
    assert error.reason is RejectReason.PAYLOAD_TOO_LARGE and error.body()["max_image_pixels"] == 28 * 28 - 1


@pytest.mark.parametrize("shape, limits", [
    ((1, 28, 28), InputLimits(json_bytes=41_728, png_bytes=266_240, png_pixels=25_088, jpeg_bytes=16_640,
                              jpeg_pixels=401_408)),
    ((3, 32, 32), InputLimits(json_bytes=151_552, png_bytes=327_680, png_pixels=32_768, jpeg_bytes=8 << 20,
                              jpeg_pixels=1 << 24)),
    ((3, 224, 224), InputLimits(json_bytes=7_229_440, png_bytes=12_910_592, png_pixels=1_605_632,
                                jpeg_bytes=8 << 20, jpeg_pixels=25_690_112)),
])
def test_limits_are_derived_from_the_input_shape_per_format(shape: tuple[int, int, int], limits: InputLimits) -> None:
    assert derive_limits(shape) == limits == InputSpec(shape).limits


def test_explicit_limits_override_every_format() -> None:
    limits = InputSpec((1, 28, 28), max_payload_bytes=100, max_image_pixels=7).limits
    assert {limits.max_bytes(f) for f in BodyFormat} == {100} and limits.max_bytes() == 100
    assert limits.png_pixels == limits.jpeg_pixels == 7


def _jpeg_of(width: int, height: int, mode: str = "RGB", quality: int = 85, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth gradients plus sensor noise (so it compresses like a camera's)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 128 + 60 * np.sin(xx / 97) * np.cos(yy / 61)
    planes = [np.clip(base + 30 * k + rng.normal(0, 6, base.shape), 0, 255) for k in range(len(mode))]
    return encode(Image.fromarray(np.stack(planes, -1).astype(np.uint8).squeeze()), "JPEG", quality=quality)


def test_a_photo_model_accepts_a_twelve_megapixel_camera_jpeg() -> None:
    photo = _jpeg_of(4032, 3024)  # a 12-megapixel phone camera's frame
    assert len(photo) > InputSpec((1, 28, 28)).limits.jpeg_bytes  # more than a digit model takes
    for shape in ((3, 32, 32), (3, 224, 224)):
        x = decode(photo, "image/jpeg", InputSpec(shape)).x
        assert x.shape == shape and 0.3 < float(x.mean()) < 0.8
    error = rejected(photo, "image/jpeg", InputSpec((1, 28, 28)))
    assert error.reason is RejectReason.PAYLOAD_TOO_LARGE and error.body()["max_payload_bytes"] == 266_240


def test_a_digit_model_refuses_a_large_png_before_decoding_it() -> None:
    spec = InputSpec((1, 28, 28))
    side = math.isqrt(spec.limits.png_pixels)  # 158 x 158 is the largest square PNG it takes
    assert decode(grey_png(make_digit(side, side)), "image/png", spec).x.shape == (1, 28, 28)
    flat = encode(Image.new("L", (4000, 4000)), "PNG")  # 16 megapixels in 20 kB: small in bytes, not to decode
    assert len(flat) < spec.limits.png_bytes
    error = rejected(flat, "image/png", spec)
    assert error.reason is RejectReason.PAYLOAD_TOO_LARGE and error.body()["max_image_pixels"] == 25_088


def test_byte_limits_follow_the_body_format() -> None:
    spec = InputSpec((1, 28, 28))
    json_too_big = b'{"data": ' + b" " * spec.limits.json_bytes + b"[]}"
    assert len(json_too_big) < spec.limits.png_bytes  # within the largest limit, over the JSON one
    error = rejected(json_too_big, "application/json", spec)
    assert error.reason is RejectReason.PAYLOAD_TOO_LARGE and error.body()["max_payload_bytes"] == 41_728
    padded_png = encode(Image.fromarray(INK), "PNG", pnginfo=_text_chunk(spec.limits.jpeg_bytes))
    assert decode(padded_png, "image/png", spec).x.shape == (1, 28, 28)  # over the JPEG byte limit, a PNG is fine


def _text_chunk(size: int) -> Any:
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * size)
    return info


def test_pillow_decompression_bomb_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises beyond twice this
    error = rejected(grey_png(), "image/png")
    assert error.reason is RejectReason.PAYLOAD_TOO_LARGE and error.reason.status == 413


PNG_BODY, JPEG_BODY = grey_png(), encode(Image.fromarray(INK), "JPEG")


@pytest.mark.parametrize("body", [PNG_BODY[:60], PNG_BODY[: len(PNG_BODY) // 2], JPEG_BODY[: len(JPEG_BODY) // 2],
                                  b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"\xff\xd8\xff" + b"\0" * 40])
def test_corrupt_or_truncated_images_are_undecodable(body: bytes) -> None:
    error = rejected(body, "image/png")
    assert error.reason is RejectReason.UNDECODABLE_IMAGE and "corrupt or truncated" in error.message


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "TIFF"])
def test_other_image_formats_are_undecodable(fmt: str) -> None:
    error = rejected(encode(Image.fromarray(INK), fmt), "image/png")
    assert error.reason is RejectReason.UNDECODABLE_IMAGE and "neither JSON nor a PNG/JPEG" in error.message


# ------------------------------------------------------------------------------------------------ rejections
def test_every_status_has_a_phrase_and_bodies_are_json() -> None:
    assert {reason.status for reason in RejectReason} <= set(HTTP_PHRASES)
    assert RejectReason.PAYLOAD_TOO_LARGE.status == 413 and RejectReason.UNSUPPORTED_CONTENT_TYPE.status == 415
    assert RejectReason.INTERNAL_ERROR.status == 500 and RejectReason.TOO_MANY_INPUTS.status == 400
    error = RequestRejected(RejectReason.WRONG_SHAPE, "x" * 5000, expected_shape=[1, 2, 3])
    assert len(error.message) == MAX_MESSAGE_CHARS
    assert json.loads(json.dumps(error.body()))["expected_shape"] == [1, 2, 3]


def test_input_spec_validation() -> None:
    for bad in ({"shape": (1, 28)}, {"shape": (0, 28, 28)}, {"shape": (1, 28, 28), "background": 1.5},
                {"shape": (1, 28, 28), "max_payload_bytes": 0}, {"shape": (1, 28, True + 0.5)},
                {"shape": (1, 28, 28), "background": math.nan}, {"shape": (1, 28, 28), "background": True}):
        with pytest.raises(ValueError):
            InputSpec(**bad)


# --------------------------------------------------------------------------------------------- property tests
LOSSLESS_CASES = [("PNG", mode, key) for mode, key in [("1", False), ("1", True), ("L", False), ("L", True),
                                                       ("LA", False), ("P", False), ("P", True), ("RGB", False),
                                                       ("RGB", True), ("RGBA", False), ("I;16", False),
                                                       ("I;16", True)]]
IMAGE_CASES = LOSSLESS_CASES + [("JPEG", "L", False), ("JPEG", "RGB", False), ("JPEG", "CMYK", False)]
BANDS = {"1": 1, "L": 1, "LA": 2, "P": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}


@st.composite
def image_bodies(draw: st.DrawFn) -> bytes:
    """PNG/JPEG bytes of a random image: every mode those formats carry, keys, EXIF orientations, odd sizes."""
    fmt, mode, keyed = draw(st.sampled_from(IMAGE_CASES))
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "I;16":
        image = Image.frombytes(mode, (width, height), rng.integers(0, 65536, (height, width)).astype("<u2").tobytes())
    elif mode in ("1", "P"):
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert(mode)
    else:
        pixels = rng.integers(0, 256, (height, width, BANDS[mode]), dtype=np.uint8)
        image = Image.frombytes(mode, (width, height), pixels.tobytes())
    options: dict[str, Any] = {}
    if keyed:
        options["transparency"] = {"RGB": tuple(int(v) for v in rng.integers(0, 256, 3)), "I;16": int(
            rng.integers(0, 65536)), "1": int(rng.integers(0, 2))}.get(mode, int(rng.integers(0, 256)))
    orientation = draw(st.sampled_from([None, *range(1, 9)]))
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        options["exif"] = exif
    if fmt == "JPEG":
        options["quality"] = draw(st.integers(10, 95))
    return encode(image, fmt, **options)


specs = st.builds(
    InputSpec,
    shape=st.tuples(st.sampled_from([1, 3]), st.integers(1, 32), st.integers(1, 32)),
    background=st.floats(0.0, 1.0),
    max_image_pixels=st.none() | st.integers(1, 96 * 96),
)


def _decodes_or_rejects(body: bytes, spec: InputSpec) -> DecodedInput | None:
    try:
        decoded = decode(body, "image/png", spec)
    except RequestRejected as error:
        assert len(error.message) <= MAX_MESSAGE_CHARS and not REPR.search(error.message)
        return None
    x = decoded.x
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == spec.shape
    assert x.flags.c_contiguous and np.isfinite(x).all() and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert decoded.protocol is Protocol.RAW
    return decoded


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=image_bodies(), spec=specs)
def test_property_images_decode_to_spec_or_reject(body: bytes, spec: InputSpec) -> None:
    with Image.open(io.BytesIO(body)) as image:
        fmt = BodyFormat.PNG if image.format == "PNG" else BodyFormat.JPEG
        over = image.width * image.height > spec.limits.max_pixels(fmt) or len(body) > spec.limits.max_bytes(fmt)
    if over:
        assert rejected(body, "image/png", spec).reason is RejectReason.PAYLOAD_TOO_LARGE
    else:
        assert _decodes_or_rejects(body, spec) is not None  # valid PNG/JPEG of any mode within the limits


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=image_bodies(), spec=specs, cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=4))
def test_property_damaged_images_decode_or_reject(body: bytes, spec: InputSpec, cut: float,
                                                  flips: list[tuple[float, int]]) -> None:
    damaged = bytearray(body[: max(1, int(len(body) * cut))])
    for where, value in flips:
        damaged[int(where * len(damaged))] = value
    _decodes_or_rejects(bytes(damaged), spec)


JSON_LEAVES = (st.floats(allow_nan=True, allow_infinity=True) | st.floats(0.0, 1.0) | st.integers(-2, 2 ** 70)
               | st.booleans() | st.none() | st.text(max_size=3) | st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                 max_size=1))
json_trees = st.recursive(JSON_LEAVES, lambda children: st.lists(children, max_size=4), max_leaves=40)
json_shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))


def _depth(value: Any) -> int:
    return 1 + max(map(_depth, value), default=0) if isinstance(value, list) else 0


@st.composite
def json_data(draw: st.DrawFn, shape: tuple[int, int, int]) -> tuple[Any, np.ndarray | None]:
    """A "data" value for `shape` and the input it must decode to (None: it must be refused): a regular array
    (with or without a batch axis), then maybe wrapped deeper, made ragged, or given a value of another type."""
    values = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=math.prod(shape), max_size=math.prod(shape)))
    array = np.asarray(values, dtype=np.float32).reshape(shape)
    data: Any = array[None].tolist() if draw(st.booleans()) else array.tolist()
    expected: np.ndarray | None = array
    change = draw(st.sampled_from(["none", "deeper", "ragged", "mixed", "tree"]))
    if change == "deeper":
        data = _nested(data, draw(st.integers(1, 40)))
        expected = array if _depth(data) == len(shape) + 1 else None  # one level more is the batch axis
    elif change == "ragged":
        row = data
        for _ in range(draw(st.integers(0, _depth(data) - 1))):
            row = row[draw(st.integers(0, len(row) - 1))]
        row.append(draw(json_trees) if draw(st.booleans()) else list(row))
        expected = None
    elif change == "mixed":
        row = data
        while isinstance(row[0], list):
            row = row[draw(st.integers(0, len(row) - 1))]
        row[draw(st.integers(0, len(row) - 1))] = draw(JSON_LEAVES.filter(  # anything but a number in [0, 1]
            lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0))
        expected = None
    elif change == "tree":
        data, expected = draw(json_trees), None
    return data, expected


def _json_outcome(document: Any, spec: InputSpec) -> DecodedInput | RequestRejected:
    try:
        return decode_request({"body": document}, {}, spec)
    except RequestRejected as error:
        assert error.reason.status in (400, 413) and len(error.message) <= MAX_MESSAGE_CHARS
        assert not REPR.search(error.message), error.message
        return error


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), shape=json_shapes, v2=st.booleans())
def test_property_json_of_any_nesting_and_types_decodes_exactly_or_is_a_4xx(data: st.DataObject,
                                                                           shape: tuple[int, int, int],
                                                                           v2: bool) -> None:
    spec = InputSpec(shape)
    values, expected = data.draw(json_data(shape))
    declared = (1, *shape) if _depth(values) == len(shape) + 1 else shape  # v2: the nesting must match the shape
    document = v2_request(values, declared) if v2 else {"data": values}
    text = json.dumps(document).encode()  # NaN / Infinity literals for non-finite floats
    parsed, raw = _json_outcome(document, spec), _json_outcome(text, spec)
    for outcome in (parsed, raw):
        if expected is not None:
            assert isinstance(outcome, DecodedInput), outcome
            np.testing.assert_array_equal(outcome.x, expected)
            assert outcome.x.dtype == np.float32 and outcome.x.flags.c_contiguous
        else:
            assert isinstance(outcome, RequestRejected)
            if _depth(values) > len(shape) + 1:
                assert outcome.reason in (RejectReason.WRONG_SHAPE, RejectReason.OUT_OF_RANGE,
                                          RejectReason.PAYLOAD_TOO_LARGE), outcome.message
    if isinstance(parsed, RequestRejected) and isinstance(raw, RequestRejected) and \
            RejectReason.PAYLOAD_TOO_LARGE not in (parsed.reason, raw.reason) and \
            RejectReason.OUT_OF_RANGE not in (parsed.reason, raw.reason):  # the parser refuses huge literals first
        assert parsed.reason is raw.reason


# ------------------------------------------------------------------- what TorchServe 0.12 really hands a handler
class _FakeSocket:
    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def recv(self, size: int) -> bytes:
        return self._stream.read(size)


def torchserve_request(headers: dict[str, str], parameters: list[tuple[str, str, bytes]]) -> tuple[Any, dict]:
    """One request framed as the frontend's ModelRequestEncoder does, read back by TorchServe's worker code.

    parameters: (name, content type or "" for none, value) as the frontend makes them: ("body", mime type, bytes)
    for a plain body, one per form field for multipart. Returns (row, headers) as the handler receives them.
    """
    otf = pytest.importorskip("ts.protocol.otf_message_handler")
    service = pytest.importorskip("ts.service")
    frame = bytearray(b"I")

    def put(value: bytes) -> None:
        frame.extend(struct.pack("!i", len(value)) + value)

    put(b"request-0")
    for name, value in headers.items():
        put(name.encode())
        put(value.encode())
    frame.extend(struct.pack("!i", -1))
    for name, content_type, value in parameters:
        put(name.encode())
        put(content_type.encode())
        put(value)
    frame.extend(struct.pack("!i", -1) * 2)  # end of parameters, end of batch
    command, batch = otf.retrieve_msg(_FakeSocket(bytes(frame)))
    assert command == otf.PREDICT_MSG
    header_list, rows, _ = service.Service.retrieve_data_for_inference(batch)
    return rows[0], header_list[0].get_request_properties()


def test_torchserve_raw_image_body_is_a_bytearray_named_body() -> None:
    row, headers = torchserve_request({"Content-Type": "image/png"}, [("body", "image/png", grey_png())])
    assert list(row) == ["body"] and isinstance(row["body"], bytearray)
    assert headers["body"] == {"content-type": "image/png"}  # per-parameter entry among the headers
    np.testing.assert_array_equal(decode_request(row, headers, SPEC).x, REF)


def test_torchserve_parses_json_bodies_and_forwards_the_ones_it_cannot() -> None:
    body = json_body({"data": REF.tolist()})
    row, headers = torchserve_request({"Content-Type": "application/json; charset=utf-8"},
                                      [("body", "application/json", body)])
    assert isinstance(row["body"], dict)
    np.testing.assert_array_equal(decode_request(row, headers, SPEC).x, REF)

    row, headers = torchserve_request({"Content-Type": "application/json"},
                                      [("body", "application/json", b"\xef\xbb\xbf" + body)])
    assert isinstance(row["body"], bytearray)  # json.loads refused the BOM
    np.testing.assert_array_equal(decode_request(row, headers, SPEC).x, REF)

    huge = body.replace(b"0.0", b"9" * 5000, 1)
    row, headers = torchserve_request({"Content-Type": "application/json"}, [("body", "application/json", huge)])
    assert isinstance(row["body"], bytearray)  # int-str digit limit: ValueError inside json.loads
    with pytest.raises(RequestRejected) as info:
        decode_request(row, headers, SPEC)
    assert info.value.reason is RejectReason.OUT_OF_RANGE


def test_torchserve_text_bodies_arrive_as_str() -> None:
    body = json_body(v2_request())
    row, headers = torchserve_request({"Content-Type": "text/plain"}, [("body", "text/plain", body)])
    assert isinstance(row["body"], str)
    assert decode_request(row, headers, SPEC).protocol is Protocol.OPEN_INFERENCE_V2


def test_torchserve_multipart_fields_are_keyed_by_name() -> None:
    multipart = {"Content-Type": "multipart/form-data; boundary=----x"}
    row, headers = torchserve_request(multipart, [("data", "image/png", grey_png())])
    assert list(row) == ["data"]
    np.testing.assert_array_equal(decode_request(row, headers, SPEC).x, REF)

    row, headers = torchserve_request(multipart, [("doc", "application/json", json_body({"data": REF.tolist()}))])
    assert isinstance(row["doc"], dict)  # a JSON file part is parsed too
    np.testing.assert_array_equal(decode_request(row, headers, SPEC).x, REF)

    row, headers = torchserve_request(multipart, [("a", "image/png", grey_png()), ("b", "", b"note")])
    assert set(row) == {"a", "b"}
    with pytest.raises(RequestRejected) as info:
        decode_request(row, headers, SPEC)
    assert info.value.reason is RejectReason.TOO_MANY_INPUTS


def test_torchserve_form_urlencoded_arrives_split() -> None:
    row, headers = torchserve_request({"content-type": "application/x-www-form-urlencoded"},
                                      [("{\"data\": [[[0.5]]]}", "", b"")])
    with pytest.raises(RequestRejected) as info:
        decode_request(row, headers, SPEC)
    assert info.value.reason is RejectReason.UNSUPPORTED_CONTENT_TYPE and info.value.reason.status == 415
