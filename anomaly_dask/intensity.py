"""Pixel maths between raw values and what the backbone sees: the intensity map and no-data fill.

Everything here works on numpy arrays already read; nothing opens a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ImageReadError

if TYPE_CHECKING:
    from .io.base import ImageSource

__all__ = ["Intensity", "fit_intensity", "mirror_fill", "to_unit_rgb"]


@dataclass(frozen=True)
class Intensity:
    """Linear map of raw pixel values onto ``[0, 1]``: ``(x - low) / (high - low)``, clipped.

    Attributes
    ----------
    low, high : float
        Raw values mapped to 0 and 1.
    gray : bool
        Whether the model sees images as single-band (colour inputs converted to luminance)
        rather than RGB (single-band inputs replicated).
    fill : float
        Value in ``[0, 1]`` written into no-data pixels before the backbone (the median of
        valid training pixels), so that no-data borders look like plain seabed rather than
        a black cliff.
    """

    low: float = 0.0
    high: float = 255.0
    gray: bool = False
    fill: float = 0.5


def mirror_fill(x: np.ndarray, valid: np.ndarray, reach: int, fill: float) -> np.ndarray:
    """Fill invalid pixels with the valid data mirrored across the nearest edge, in place.

    An invalid pixel ``p`` whose nearest valid pixel ``b`` lies within ``reach`` takes the
    value at ``2 b - p`` (its reflection through the edge) when that pixel is valid and in
    the array, else the value at ``b``; farther pixels take ``fill``. Along a straight edge
    the texture continues as its own mirror image, so a backbone sees no artificial step
    where the data ends. Each filled value depends only on pixels within ``2 reach`` of it,
    so windows that overlap by that much fill their common pixels alike.

    Parameters
    ----------
    x : ndarray (h, w, c)
        Pixels; changed where ``valid`` is False.
    valid : ndarray of bool (h, w)
        Valid pixels.
    reach : int
        Largest distance to data, in pixels, filled by mirroring.
    fill : float
        Value of the other invalid pixels.

    Returns
    -------
    ndarray
        ``x``.
    """
    from scipy.ndimage import distance_transform_edt

    hole = ~valid
    if not valid.any():
        x[:] = fill
        return x
    dist, (ny, nx) = distance_transform_edt(hole, return_indices=True)
    far = hole & (dist > reach)
    py, px = np.nonzero(hole & ~far)
    by, bx = ny[py, px], nx[py, px]
    ry, rx = 2 * by - py, 2 * bx - px
    ok = (ry >= 0) & (ry < valid.shape[0]) & (rx >= 0) & (rx < valid.shape[1])
    ok[ok] = valid[ry[ok], rx[ok]]
    x[py, px] = x[np.where(ok, ry, by), np.where(ok, rx, bx)]
    x[far] = fill
    return x


def to_unit_rgb(
    raw: np.ndarray, intensity: Intensity, valid: np.ndarray | None = None, mirror: int = 0
) -> np.ndarray:
    """Map raw pixels (h, w, 1 or 3) to float32 RGB in ``[0, 1]`` as the model sees them.

    NaN becomes 0. Pixels where ``valid`` is False become ``intensity.fill``, or with
    ``mirror > 0`` the data mirrored across the nearest edge up to that many pixels from it
    (:func:`mirror_fill`).

    Parameters
    ----------
    raw : ndarray (h, w, 1 or 3)
        Raw pixels.
    intensity : Intensity
        The map of raw values onto ``[0, 1]``.
    valid : ndarray of bool (h, w), optional
        Pixels that hold data; None when all do.
    mirror : int
        Reach of the mirrored fill in pixels; 0 fills with ``intensity.fill``.

    Returns
    -------
    ndarray (h, w, 3)
        float32 RGB (gray models get luminance replicated on the three bands).
    """
    x = raw.astype(np.float32)
    scale = 1.0 / max(intensity.high - intensity.low, 1e-12)
    x = np.nan_to_num(np.clip((x - intensity.low) * scale, 0.0, 1.0), nan=0.0)
    if valid is not None:
        if mirror > 0:
            mirror_fill(x, valid, mirror, intensity.fill)
        else:
            x[~valid] = intensity.fill
    if intensity.gray and x.shape[2] == 3:
        x = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return x


def fit_intensity(
    sources: Sequence[ImageSource], samples: Sequence[np.ndarray], nodata: float | None = None
) -> Intensity:
    """Choose the intensity map for a training set.

    Parameters
    ----------
    sources : sequence of ImageSource
        Training images.
    samples : sequence of ndarray
        Raw pixel samples from them.
    nodata : float, optional
        Value excluded from the percentiles (NaN always is).

    Returns
    -------
    Intensity
        ``[0, 255]`` for 8-bit data; otherwise the 0.5 and 99.5 percentiles of the valid
        sampled values. ``gray`` is set when every training image has one band; ``fill`` is
        the median valid value.
    """
    gray = all(s.channels == 1 for s in sources)
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples])
    values = values[np.isfinite(values)]
    if nodata is not None and not np.isnan(nodata):
        values = values[values != nodata]
    if values.size == 0:
        raise ImageReadError(
            "training images hold no valid pixel values (all NaN or no-data); check nodata="
        )
    if all(np.dtype(s.dtype) == np.uint8 for s in sources):
        low, high = 0.0, 255.0
    else:
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        if high <= low:
            high = low + 1.0
    fill = float(np.clip((np.median(values) - low) / (high - low), 0.0, 1.0))
    return Intensity(low, high, gray, fill)
