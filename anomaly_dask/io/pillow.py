"""Ordinary image files (PNG, JPEG, BMP, GIF, WebP, TIFF that needs Pillow) decoded whole.

Pillow cannot read a region of a compressed image, so a file is decoded once per process
and kept in a small cache; :class:`PILSource` then slices windows out of it. Pillow's
decompression-bomb guard stays on: an image too large for it is refused with a message that
suggests a tiled TIFF or zarr instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError, InputNotFoundError
from .base import ImageSource, freeze_options, thaw_options

__all__ = ["PILSource", "open_pillow"]

#: Pillow modes holding one band of 8, 16 or 32-bit (or float) values.
_GRAY_MODES = ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")
#: Pillow modes converted to RGB (alpha and padding bands dropped).
_TO_RGB_MODES = ("RGBA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX", "RGBa")


def _to_raw(img: Image.Image, name: str) -> np.ndarray:
    """Pixels of a Pillow image as (h, w, 1 or 3); alpha dropped, palette expanded."""
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode == "LA":
        img, mode = img.getchannel("L"), "L"
    if mode in _TO_RGB_MODES:
        img, mode = img.convert("RGB"), "RGB"
    if mode in _GRAY_MODES:
        arr = np.asarray(img)
        if mode.startswith("I;16"):
            arr = arr.astype(np.uint16)
        return arr[:, :, None]
    if mode == "RGB":
        return np.asarray(img)
    raise ImageReadError(
        f"{name}: unsupported image mode {mode!r}; convert it to grayscale or RGB (8 or 16 bit)"
    )


@lru_cache(maxsize=8)
def _decode(url: str, options_key: Any) -> np.ndarray:
    """All raw pixels of the image at ``url`` (``options_key``: frozen storage options)."""
    storage_options = thaw_options(options_key) or {}
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            data = f.read()
    except FileNotFoundError as err:
        raise InputNotFoundError(f"{url!r} does not exist") from err
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_raw(img, url)
    except Image.DecompressionBombError as err:
        raise ImageReadError(
            f"{url}: too large for Pillow ({err}); store it as a tiled TIFF or zarr instead"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageReadError):
            raise
        raise ImageReadError(
            f"{url}: cannot be read as an image ({err}); it is corrupt or not an image - "
            f"re-export it or remove it from the input folder"
        ) from err


@dataclass(frozen=True)
class PILSource(ImageSource):
    """An ordinary image file (PNG, JPEG, ...) decoded whole by Pillow, cached per process.

    Attributes
    ----------
    name : str
        Local path or fsspec URL.
    height, width, channels : int
        Image shape; channels 1 or 3.
    dtype : numpy.dtype
        Pixel type.
    storage_options : Any
        fsspec options, frozen with :func:`~anomaly_dask.io.base.freeze_options`.
    """

    name: str
    height: int
    width: int
    channels: int
    dtype: np.dtype
    storage_options: Any = field(default=(), repr=False)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return _decode(self.name, self.storage_options)[y0:y1, x0:x1]

    def read_all(self) -> np.ndarray:
        """All raw pixels, shape (height, width, channels)."""
        return _decode(self.name, self.storage_options)


def open_pillow(url: str, storage_options: dict[str, Any] | None = None) -> PILSource:
    """Decode an image file with Pillow (once per process) and describe it.

    Parameters
    ----------
    url, storage_options : str, dict or None
        Local path or fsspec URL, and the fsspec options it is read with.

    Returns
    -------
    PILSource

    Raises
    ------
    InputNotFoundError, ImageReadError
        Missing file; unreadable, too large or unsupported image.
    """
    key = freeze_options(storage_options or {})
    raw = _decode(url, key)
    return PILSource(url, raw.shape[0], raw.shape[1], raw.shape[2], raw.dtype, key)
