"""The same picture at another bit depth: rescaling inputs to the units a model was trained on.

A model maps raw values to its input range with a map learned on its training images
(:class:`~anomaly_dask.intensity.Intensity`), so an 8-bit copy of a 16-bit survey, or a
float export of it, must be rescaled before scoring. :func:`match_bit_depth` decides from
the pixel types and a sample of values, and wraps the input in a :class:`ScaledSource` when
a factor is needed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ImageReadError
from .base import ImageSource

if TYPE_CHECKING:
    from ..georef import Georef

__all__ = ["ScaledSource", "match_bit_depth"]

#: Full-scale value of each integer pixel type a model may meet (floats: see match_bit_depth).
_FULL_SCALE = {"uint8": 255.0, "uint16": 65535.0}


@dataclass(frozen=True, eq=False)
class ScaledSource(ImageSource):
    """Another source's pixels times ``factor`` (float32): the same data at another bit depth.

    No-data pixels (the inner source's no-data value or any of ``nodata_raw``) read as NaN,
    so that no comparison with a rescaled no-data value is needed.

    Attributes
    ----------
    inner : ImageSource
        The image as stored.
    factor : float
        Multiplier taking its values to the units the model was trained on.
    nodata_raw : tuple of float
        Raw values (in ``inner``'s units) that mean no data.
    """

    inner: ImageSource
    factor: float
    nodata_raw: tuple = ()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def height(self) -> int:  # type: ignore[override]
        return self.inner.height

    @property
    def width(self) -> int:  # type: ignore[override]
        return self.inner.width

    @property
    def channels(self) -> int:  # type: ignore[override]
        return self.inner.channels

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return np.dtype(np.float32)

    @property
    def nodata(self) -> float | None:  # type: ignore[override]
        return float("nan")

    @property
    def georef(self) -> Georef | None:  # type: ignore[override]
        return self.inner.georef

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raw = self.inner.read(y0, y1, x0, x1)
        out = raw.astype(np.float32) * np.float32(self.factor)
        for value in self.nodata_raw:
            if value is not None and not np.isnan(value):
                out[(raw == value).all(axis=2)] = np.nan
        return out


def _sample_max(source: ImageSource, nodata: float | None, n: int = 4, side: int = 256) -> float:
    """Largest valid value in an ``n`` x ``n`` lattice of windows spread over ``source``."""
    best = float("-inf")
    h, w = min(side, source.height), min(side, source.width)
    for y in np.linspace(0, source.height - h, n).astype(int):
        for x in np.linspace(0, source.width - w, n).astype(int):
            block = np.asarray(source.read(int(y), int(y) + h, int(x), int(x) + w), dtype=np.float64)
            block = block[np.isfinite(block)]
            if nodata is not None and not np.isnan(nodata):
                block = block[block != nodata]
            if block.size:
                best = max(best, float(block.max()))
    return best


def match_bit_depth(source: ImageSource, trained: str | None, nodata: float | None) -> ImageSource:
    """``source`` in the units of a model trained on ``trained`` pixels, or a clear error.

    A model maps raw values to its input range with a map learned on its training images, so
    the same picture stored at another bit depth must be rescaled first. Handled: 8-bit and
    16-bit copies of each other (by the ratio of full scales, 65535 / 255 = 257, or as they
    are when a 16-bit image holds only 8-bit values), and float copies in ``[0, 1]`` or in
    the integer type's own range. Models trained on other types (float, signed, mixed) take
    inputs as they are.

    Parameters
    ----------
    source : ImageSource
        The image to score.
    trained : str or None
        The pixel type of the model's training images (``"uint8"``, ``"uint16"``, another
        numpy type name, ``"mixed"``, or None for a model that does not record it).
    nodata : float, optional
        The run's no-data value (raw units), if any.

    Returns
    -------
    ImageSource
        ``source`` itself, or a :class:`ScaledSource` over it.

    Raises
    ------
    ImageReadError
        When the values fit neither reading (e.g. float values up to 4000 for an 8-bit
        model); the message says how to convert the image.
    """
    have = np.dtype(source.dtype).name
    if trained is None or have == trained or trained not in _FULL_SCALE:
        return source
    full = _FULL_SCALE[trained]
    nd = nodata if nodata is not None else source.nodata
    top = _sample_max(source, nd)
    factor: float | None = None
    if have in _FULL_SCALE:
        if top <= full:
            factor = 1.0  # e.g. 8-bit values stored in a 16-bit file
        else:
            factor = full / _FULL_SCALE[have]
        if have == "uint8" and trained == "uint16":
            factor = _FULL_SCALE["uint16"] / _FULL_SCALE["uint8"]
    elif np.issubdtype(np.dtype(have), np.floating):
        if top <= 1.0:
            factor = full
        elif top <= full:
            factor = 1.0
    if factor is None:
        raise ImageReadError(
            f"{source.name}: pixels are {have} with values up to {top:g}, but the model was "
            f"trained on {trained} images (0-{full:g}); convert the image to {trained}, or "
            f"scale it to [0, 1] or [0, {full:g}], or train a model on images like it"
        )
    how = "used as they are (they lie in its range)" if factor == 1.0 else f"multiplied by {factor:g}"
    warnings.warn(
        f"{source.name}: {have} pixels scored by a model trained on {trained} images; values {how}",
        stacklevel=2,
    )
    if factor == 1.0 and have in _FULL_SCALE:
        return source
    return ScaledSource(source, float(factor), tuple(v for v in (source.nodata, nodata) if v is not None))
