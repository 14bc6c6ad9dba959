"""The evaluation transform: the one preprocessing that evaluation images and a server's client images go through.

Torch-free (Pillow and numpy), so that the evaluation data pipeline (`training/data.py`) and the server's
request decoding (`serving/decoding.py`) call the same code and give the same tensors by construction. The
checkpoint's dataset entry and the manifest's `input_transform` hold it as `EvalTransform.to_dict()`.

Definition: torchvision's classification presets (`Resize(resize_size)` then `CenterCrop(crop_size)` on a PIL
image, then `ToTensor`), written out so that nothing is left to a library default:

0. JPEG only, before decoding (`EvalTransform.draft`): Pillow's DCT-domain reduction by the largest s in
   {8, 4, 2, 1} with both sides // s still >= `resize_size` (`Image.draft(mode, (resize_size, resize_size))`);
   this keeps decoding a 12-megapixel photo cheap, and the shorter side never drops below `resize_size`.
1. Resize so the SHORTER side is `resize_size`: new_short = resize_size, new_long = int(resize_size * long / short)
   (Python float division, truncated: torchvision's `_compute_resized_output_size`). Skipped when the size is
   already right. Pillow `Image.resize(size, resample=interpolation, reducing_gap=None)`: one separable
   convolution over the whole source with the filter's support widened by the reduction factor (antialiased,
   what torchvision's PIL backend does); `reducing_gap` is off, so there is no integer box pre-reduction whose
   result would depend on the source size. Alpha is premultiplied by Pillow while resizing.
2. Centre crop to (crop_height, crop_width): top = int(round((h - crop_height) / 2.0)), left = int(round((w -
   crop_width) / 2.0)), Python's round (half to even), as torchvision's `center_crop`. A side shorter than the
   crop is first padded symmetrically to it (left/top (crop - size) // 2, torchvision's split), with transparent
   pixels in modes with alpha and `background` otherwise (`planes` adds an alpha band first, so padding always
   ends up exactly `background`).
3. To numbers: float32(pixel) / 255 (8-bit modes), H x W x C -> C x H x W; an alpha band a is then composited
   onto `background`: a * colour + (1 - a) * background (`composite`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["EIGHT_BIT_BASE", "EvalTransform", "Interpolation", "TransformError", "composite", "unit_planes"]

U8_MAX = np.float32(255.0)
IMAGE_CHANNELS = {1: "L", 3: "RGB"}  # declared channels -> the Pillow mode images are converted to
# 8-bit modes -> the mode Pillow converts them to before `EvalTransform.planes` (palette and premultiplied modes
# expanded, colour spaces to RGB); "P" goes to RGBA so that tRNS / palette alpha survives. Used by the server's
# decoding and the image-folder loader alike.
EIGHT_BIT_BASE = {
    "1": "L", "L": "L", "LA": "LA", "La": "LA", "P": "RGBA", "PA": "RGBA",
    "RGB": "RGB", "RGBA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "HSV": "RGB",
}


class TransformError(ValueError):
    """An inconsistent transform (a configuration or manifest error, not a request error)."""


class Interpolation(str, Enum):
    """The resize filter (Pillow's), by torchvision's InterpolationMode names."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"

    @property
    def resample(self) -> Image.Resampling:
        return {Interpolation.NEAREST: Image.Resampling.NEAREST, Interpolation.BILINEAR: Image.Resampling.BILINEAR,
                Interpolation.BICUBIC: Image.Resampling.BICUBIC}[self]


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class EvalTransform:
    """Shorter side to `resize_size`, centre crop to `crop_size` (H, W), `channels` (1: luma "L", 3: "RGB").

    See the module docstring for the exact definition. Raises TransformError for channels other than 1 or 3 or
    sizes that are not positive integers.
    """

    channels: int
    resize_size: int
    crop_size: tuple[int, int]  # (height, width)
    interpolation: Interpolation = Interpolation.BILINEAR

    def __post_init__(self) -> None:
        if self.channels not in IMAGE_CHANNELS or isinstance(self.channels, bool):
            raise TransformError(f"channels must be 1 or 3, got {self.channels!r}")
        if not _positive_int(self.resize_size):
            raise TransformError(f"resize_size must be a positive integer, got {self.resize_size!r}")
        crop = tuple(self.crop_size) if isinstance(self.crop_size, (tuple, list)) else ()
        if len(crop) != 2 or not all(_positive_int(c) for c in crop):
            raise TransformError(f"crop_size must be two positive integers (height, width), got {self.crop_size!r}")
        try:
            interpolation = Interpolation(self.interpolation)
        except ValueError:
            raise TransformError(f"interpolation must be one of {[i.value for i in Interpolation]}, "
                                 f"got {self.interpolation!r}") from None
        object.__setattr__(self, "channels", int(self.channels))
        object.__setattr__(self, "resize_size", int(self.resize_size))
        object.__setattr__(self, "crop_size", (int(crop[0]), int(crop[1])))
        object.__setattr__(self, "interpolation", interpolation)

    @classmethod
    def for_shape(cls, shape: tuple[int, int, int] | list[int]) -> EvalTransform:
        """The transform of a model that declares only its input shape (C, H, W): shorter side to min(H, W), then
        crop H x W, bilinear. An image of exactly H x W passes unchanged."""
        if len(shape) != 3:
            raise TransformError(f"shape must be (C, H, W), got {list(shape)}")
        channels, height, width = (int(s) for s in shape)
        return cls(channels, min(height, width), (height, width))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what `planes` returns."""
        return (self.channels, *self.crop_size)

    @property
    def mode(self) -> str:
        """The Pillow mode images are converted to: "L" or "RGB" (plus "A" while they carry transparency)."""
        return IMAGE_CHANNELS[self.channels]

    # ------------------------------------------------------------------------------------------------ geometry
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after step 1 for a width x height image (pixels)."""
        if width < 1 or height < 1:
            raise TransformError(f"image has no pixels ({width} x {height})")
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of step 2 in a width x height image at least as large as the crop."""
        crop_height, crop_width = self.crop_size
        top = int(round((height - crop_height) / 2.0))
        left = int(round((width - crop_width) / 2.0))
        return left, top, left + crop_width, top + crop_height

    def needs_padding(self, width: int, height: int) -> bool:
        """Whether a width x height image (before step 1) ends up smaller than the crop on a side."""
        new_width, new_height = self.resized_size(width, height)
        return new_width < self.crop_size[1] or new_height < self.crop_size[0]

    def draft(self, image: Image.Image) -> None:
        """Step 0, in place, on an opened image not yet loaded: a JPEG is decoded reduced (see the module
        docstring); other formats ignore it. Call before `load()`; the mode is left as it is."""
        image.draft(image.mode, (self.resize_size, self.resize_size))

    def geometry(self, image: Image.Image, fill: float | tuple[float, ...] | None = None) -> Image.Image:
        """Steps 1 and 2 on a loaded Pillow image of any mode Pillow resizes (L, LA, RGB, RGBA, I, F, ...).

        fill: the padding value in the image's own units when a side is shorter than the crop (None: 0,
        transparent in modes with alpha). Returns a new image of size crop_size.
        """
        size = self.resized_size(*image.size)
        if size != image.size:
            image = image.resize(size, resample=self.interpolation.resample, reducing_gap=None)
        crop_height, crop_width = self.crop_size
        width, height = image.size
        if width < crop_width or height < crop_height:
            canvas = Image.new(image.mode, (max(width, crop_width), max(height, crop_height)), fill or 0)
            canvas.paste(image, ((crop_width - width) // 2 if crop_width > width else 0,
                                 (crop_height - height) // 2 if crop_height > height else 0))
            image = canvas
        return image.crop(self.crop_box(*image.size))

    def planes(self, image: Image.Image, background: float) -> np.ndarray:
        """Steps 1-3 on a loaded, upright 8-bit image of mode L, LA, RGB or RGBA -> C x H x W float32 in [0, 1].

        The image is converted to the declared channels (Pillow's ITU-R 601-2 luma for grey, repetition for
        colour), keeping an alpha band, which is composited onto `background` (in [0, 1]) after resizing.
        Raises TransformError for another mode.
        """
        if image.mode not in ("L", "LA", "RGB", "RGBA"):
            raise TransformError(f"planes takes L, LA, RGB or RGBA images, got mode {image.mode}")
        has_alpha = image.mode.endswith("A") or self.needs_padding(*image.size)
        target = self.mode + ("A" if has_alpha else "")
        if image.mode != target:
            image = image.convert(target)
        return unit_planes(self.geometry(image), background)

    # ------------------------------------------------------------------------------------------------- records
    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in the checkpoint's dataset entry and the manifest's `input_transform`."""
        return {"channels": self.channels, "resize_size": self.resize_size, "crop_size": list(self.crop_size),
                "interpolation": self.interpolation.value}

    @classmethod
    def from_dict(cls, d: Any) -> EvalTransform:
        """Inverse of `to_dict`; TransformError (one line) for a malformed entry or unknown keys."""
        keys = {"channels", "resize_size", "crop_size", "interpolation"}
        if not isinstance(d, dict) or set(d) != keys:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise TransformError(f"input transform must be an object with keys {sorted(keys)}, got {got}")
        if not isinstance(d["crop_size"], list):
            raise TransformError(f"crop_size must be a list [height, width], got {d['crop_size']!r}")
        return cls(d["channels"], d["resize_size"], tuple(d["crop_size"]), d["interpolation"])


def unit_planes(image: Image.Image, background: float) -> np.ndarray:
    """An 8-bit L, LA, RGB or RGBA image -> C x H x W float32 in [0, 1]: pixel / 255, alpha composited onto
    `background` (the alpha band is dropped). C-contiguous."""
    planes = np.asarray(image, dtype=np.float32) / U8_MAX
    planes = planes.reshape(image.height, image.width, -1)
    if image.mode.endswith("A"):
        planes = composite(planes[..., :-1], planes[..., -1:], background)
    return np.ascontiguousarray(planes.transpose(2, 0, 1))


def composite(colour: np.ndarray, alpha: np.ndarray, background: float) -> np.ndarray:
    """alpha * colour + (1 - alpha) * background for colour, alpha in [0, 1] (H x W x k and H x W x 1).

    A convex combination, so the clip only absorbs float32 rounding; alpha 1 gives colour exactly.
    """
    if not (isinstance(background, (int, float)) and math.isfinite(background) and 0.0 <= background <= 1.0):
        raise TransformError(f"background must be a number in [0, 1], got {background!r}")
    back = np.float32(background)
    return np.clip(alpha * colour + (np.float32(1.0) - alpha) * back, 0.0, 1.0)
