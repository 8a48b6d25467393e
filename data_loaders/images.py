"""Encoded images of any format, size and mode (JPEG/PNG/WebP/..., L, P, RGBA, CMYK, 16-bit) ->
uint8 RGB arrays of one square size: resize the shorter side, then crop (centre, or at a position
drawn from a per-sample RNG so that a resumed run crops exactly as the uninterrupted one did).

Used by shards written elsewhere (img2dataset-style folders, see `foreign.py`), whose images come
in whatever form their source had; scaleyard's own builders write images at their final size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

CROPS = ("center", "random")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class ImageHeader:
    format: str
    mode: str
    width: int
    height: int


def read_header(payload: bytes) -> ImageHeader:
    """Format, mode and size from the image header only (no pixel decoding)."""
    with Image.open(io.BytesIO(payload)) as image:
        return ImageHeader(image.format or "?", image.mode, image.width, image.height)


def check_decodes(payload: bytes) -> ImageHeader:
    """Decode every byte of the image (raises on truncated or corrupt data) as cheaply as PIL
    allows: a JPEG is decoded at 1/8 scale (`draft`), which still entropy-decodes all of it."""
    with Image.open(io.BytesIO(payload)) as image:
        header = ImageHeader(image.format or "?", image.mode, image.width, image.height)
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    return header


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited over white, because their colour is
    undefined (often black) and `convert("RGB")` would show it; 16-bit and 32-bit grey images are
    rescaled, because PIL's conversion of them to 8 bits clips everything above 255 to white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image).astype(np.float64)
        if mode != "F" and values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range -> 8-bit range (65535 / 257 = 255)
        elif mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def crop_box(width: int, height: int, size: int, crop: str, rng: np.random.Generator | None) -> tuple[
        float, float, float, float]:
    """The source rectangle that becomes the `size` x `size` output: the shorter side is scaled to
    `size`, the longer one is cut (centred, or at a random offset of the scaled image)."""
    scale = size / min(width, height)
    scaled_w, scaled_h = max(size, round(width * scale)), max(size, round(height * scale))
    if crop == "random" and rng is not None:
        left, top = int(rng.integers(0, scaled_w - size + 1)), int(rng.integers(0, scaled_h - size + 1))
    else:
        left, top = (scaled_w - size) // 2, (scaled_h - size) // 2
    return left / scale, top / scale, (left + size) / scale, (top + size) / scale


def decode_image(payload: bytes, size: int, crop: str = "center", rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 array [size, size, 3].

    One `resize` with a source `box` does the resize and the crop together: it computes only the
    output pixels (resize-then-crop would also compute the cut-away ones) and gives the same image,
    since PIL takes the filter's support from outside the box as it would from the full resize.
    """
    with Image.open(io.BytesIO(payload)) as opened:
        image = opened
        # camera JPEGs store their rotation in EXIF; exif_transpose copies even unrotated images
        if image.getexif().get(_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        box = crop_box(image.width, image.height, size, crop, rng)
        out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out)
