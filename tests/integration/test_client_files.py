"""Files as real clients send them, through the real TorchServe: each answer must equal the answer for the
plain 8-bit PNG of the same MNIST test image (same class; same exit where the decoded pixels are the same)."""
from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

IMAGES = (0, 18, 3, 7)  # test image 0 is a 7, image 18 a 3 (the cases), plus two more


def _pixels(tiny, i: int) -> np.ndarray:
    return (tiny.test_x[i, 0] * 255).round().astype(np.uint8)


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(pixels: np.ndarray) -> bytes:
    """Stored upside down with EXIF Orientation = 3: every viewer shows it upright."""
    image = Image.fromarray(pixels[::-1, ::-1].copy(), mode="L")
    exif = Image.Exif()
    exif[0x0112] = 3
    return _save(image, "JPEG", quality=100, exif=exif.tobytes())


def png16(pixels: np.ndarray) -> bytes:
    """16-bit greyscale PNG, values x 257."""
    return _save(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG")


def rgba_white_ink(pixels: np.ndarray) -> bytes:
    """White ink whose alpha is the ink; transparent pixels stored white."""
    rgba = np.stack([np.full_like(pixels, 255)] * 3 + [pixels], axis=-1)
    return _save(Image.fromarray(rgba, mode="RGBA"), "PNG")


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "----earlyexit-test-boundary"
    parts = []
    for name, data in files:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("i", IMAGES)
def test_client_image_files_answer_like_the_plain_png(torchserve_server, i: int) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    pixels = _pixels(tiny, i)
    plain = live.predict(tiny.png(i))
    assert plain.status == 200
    for name, body, same_pixels in (("16-bit PNG", png16(pixels), True), ("RGBA white ink", rgba_white_ink(pixels), True),
                                    ("EXIF-rotated JPEG", exif_rotated_jpeg(pixels), False)):
        response = live.predict(body)
        assert response.status == 200, (name, response.body)
        assert response.body["class_index"] == plain.body["class_index"], name
        if same_pixels:
            assert response.body["exit_index"] == plain.body["exit_index"], name
            assert response.body["confidence"] == pytest.approx(plain.body["confidence"], abs=1e-6), name


def test_json_with_a_byte_order_mark_is_accepted(torchserve_server) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    plain = live.predict(tiny.json_body(0), content_type="application/json")
    bom = live.predict(b"\xef\xbb\xbf" + tiny.json_body(0), content_type="application/json")
    assert bom.status == 200 and bom.body["class_index"] == plain.body["class_index"]
    assert bom.body["exit_index"] == plain.body["exit_index"]


def test_a_huge_integer_fails_its_request_not_its_batch(torchserve_server) -> None:
    """Sent together (one batch of up to 8): the huge literal gets its own 400, everyone else is answered."""
    live, tiny = torchserve_server, torchserve_server.tiny
    huge = b'{"data": [[[' + b"9" * 5000 + b"]]]}"
    bodies = [tiny.png(i) for i in range(7)]
    bodies.insert(3, huge)
    barrier = threading.Barrier(len(bodies))
    clients = [live.client() for _ in bodies]

    def send(j: int):
        barrier.wait()
        return clients[j].predict(bodies[j], content_type="application/json" if j == 3 else "image/png")

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(send, range(len(bodies))))
    for c in clients:
        c.close()
    assert answers[3].status == 400 and answers[3].body["reason"] in ("bad_json", "out_of_range")
    assert "digits" in answers[3].body["error"] or "float32" in answers[3].body["error"]
    exits, classes = tiny.offline()
    for j, a in enumerate(answers):
        if j != 3:
            i = j if j < 3 else j - 1
            assert a.status == 200 and a.body["class_index"] == classes[i] and a.body["exit_index"] == exits[i] + 1


def test_a_multipart_form_takes_exactly_one_input(torchserve_server) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    body, content_type = multipart([("file", tiny.png(0))])
    one = live.predict(body, content_type=content_type)
    assert one.status == 200 and one.body["class_index"] == live.predict(tiny.png(0)).body["class_index"]
    body, content_type = multipart([("first", tiny.png(0)), ("second", tiny.png(1))])
    two = live.predict(body, content_type=content_type)
    assert two.status == 400 and two.body["reason"] == "too_many_inputs"
    assert "one" in two.body["error"]


def test_open_inference_protocol_v2_through_the_server(torchserve_server) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    x = tiny.test_x[0]
    body = json.dumps({"id": "v2-0", "inputs": [{"name": "image", "shape": [1, *x.shape], "datatype": "FP32",
                                                 "data": x.reshape(-1).tolist()}]}).encode()
    response = live.predict(body, content_type="application/json")
    plain = live.predict(tiny.png(0))
    assert response.status == 200 and response.body["id"] == "v2-0" and response.body["model_name"] == live.model
    (output,) = response.body["outputs"]
    assert int(np.argmax(output["data"])) == plain.body["class_index"]
    bad = live.predict(json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "INT8",
                                               "data": [0] * 784}]}).encode(), content_type="application/json")
    assert bad.status == 400 and bad.body["reason"] == "unsupported_datatype"
