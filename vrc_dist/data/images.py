"""Decode untrusted image bytes into the RGB picture a LLaVA processor expects, or refuse with the input's name.

Conversions (no EXIF rotation: the reference code and the HF processors see the stored pixels):
- transparency (RGBA, LA, palette with a transparent colour) is composited on white, the usual
  page colour, so transparent regions do not turn into arbitrary black;
- 16-bit and 32-bit integer grayscale is rescaled from its full range (PIL's own conversion clips it
  to white), float grayscale from [0, 1] when it fits there, else clipped to [0, 255];
- everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) goes through PIL's convert("RGB").
Animated images give their first frame.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

MIN_SIDE = 2  # a 1-pixel image has no spatial structure for a patch grid to describe
MAX_PIXELS = 50_000_000  # decompression-bomb guard, checked from the header before decoding
# A CLIP-style processor scales the SHORT side up to the tower's size: a 2 x 25,000,000 image (within
# MAX_PIXELS) would become 336 x 4.2e9 pixels in memory. No photo is this thin; refuse it by name.
MAX_ASPECT = 100


class ImageError(ValueError):
    pass


def load_image(data: bytes | str | Path, name: str) -> Image.Image:
    """RGB PIL image from encoded bytes or a file path; ImageError naming `name` if it can't be used."""
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else Path(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _check_size(img, name)
                img.seek(0)
                img.load()
                return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused, too many pixels ({e})") from e
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such file") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL reports bad data through all three
        raise ImageError(f"{name}: cannot decode image: {e}") from e


def _check_size(img: Image.Image, name: str) -> None:
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h} pixels; need at least {MIN_SIDE} on each side")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"{name}: image is {w}x{h} pixels, an aspect ratio over {MAX_ASPECT}:1 "
                         "(resizing its short side to the model's input size would blow it up)")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: image is {w}x{h} = {w * h / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP limit")


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _gray_to_uint8(a: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64))
        scale = 255.0 if a.min() >= 0 and a.max() <= 1 else 1.0
        return np.clip(a * scale, 0, 255).round().astype(np.uint8)
    # 16-bit data in a 32-bit mode is the common case (PNG); wider values use their own maximum.
    top = 65535 if a.max() <= 65535 else int(a.max())
    return np.clip(a.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
