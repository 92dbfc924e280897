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

__all__ = ["GAIN_FLOOR", "GAIN_LEVEL", "Intensity", "fit_intensity", "flatten_gain", "local_mean", "mirror_fill", "to_unit_rgb"]

#: Unit brightness a pixel whose surroundings are of average brightness gets from
#: :func:`flatten_gain`.
GAIN_LEVEL = 0.4
#: Darkest local mean :func:`flatten_gain` divides by, so that black areas (shadows, the
#: water column) are not amplified into noise.
GAIN_FLOOR = 1.0 / 64.0


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


#: Side in pixels of the blocks :func:`mirror_fill` fills one at a time.
FILL_BLOCK = 64


def mirror_fill(x: np.ndarray, valid: np.ndarray, reach: int, fill: float, block: int = FILL_BLOCK) -> np.ndarray:
    """Fill invalid pixels with the valid data mirrored across the nearest edge, in place.

    An invalid pixel ``p`` whose nearest valid pixel ``b`` lies within ``reach`` takes the
    value at ``2 b - p`` (its reflection through the edge) when that pixel is valid and in
    the array, else the value at ``b``; farther pixels take ``fill``. Along a straight edge
    the texture continues as its own mirror image, so a backbone sees no artificial step
    where the data ends. Each filled value depends only on pixels within ``2 reach`` of it,
    so windows that overlap by that much fill their common pixels alike.

    The nearest valid pixels come from a Euclidean feature transform. Where no-data is
    sparse (a nadir band, swath edges) it is computed block by block, only for the blocks
    of ``block`` px that hold no-data, each on the block plus ``reach`` px around it: that
    holds every valid pixel within ``reach`` of the block, so the result is the same as
    one transform of the whole array (tested), at a fraction of its cost.

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
    block : int
        Side of the blocks filled one at a time.

    Returns
    -------
    ndarray
        ``x``.
    """
    hole = ~valid
    if not valid.any():
        x[:] = fill
        return x
    h, w = valid.shape
    nb = (-(-h // block), -(-w // block))
    padded = np.zeros((nb[0] * block, nb[1] * block), dtype=bool)
    padded[:h, :w] = hole
    with_holes = np.nonzero(padded.reshape(nb[0], block, nb[1], block).any(axis=(1, 3)))
    if len(with_holes[0]) * (block + 2 * reach) ** 2 >= h * w:  # no-data everywhere: at once
        _fill_window(x, valid, reach, fill, (0, h, 0, w), (0, h, 0, w))
        return x
    for by, bx in zip(*with_holes):
        y0, x0 = by * block, bx * block
        y1, x1 = min(h, y0 + block), min(w, x0 + block)
        around = (max(0, y0 - reach), min(h, y1 + reach), max(0, x0 - reach), min(w, x1 + reach))
        _fill_window(x, valid, reach, fill, (y0, y1, x0, x1), around)
    return x


def _fill_window(
    x: np.ndarray, valid: np.ndarray, reach: int, fill: float,
    part: tuple[int, int, int, int], around: tuple[int, int, int, int],
) -> None:
    """:func:`mirror_fill` of the invalid pixels of ``part`` (y0, y1, x0, x1), with their
    nearest valid pixels looked for in ``around``, a window that holds ``part``."""
    from scipy.ndimage import distance_transform_edt

    a0, a1, b0, b1 = around
    hole = ~valid[a0:a1, b0:b1]
    own = np.zeros(hole.shape, dtype=bool)
    inner = (slice(part[0] - a0, part[1] - a0), slice(part[2] - b0, part[3] - b0))
    own[inner] = hole[inner]
    if hole.all():  # no data within reach of the part
        py, px = np.nonzero(own)
        x[py + a0, px + b0] = fill
        return
    dist, (ny, nx) = distance_transform_edt(hole, return_indices=True)
    far = own & (dist > reach)
    py, px = np.nonzero(own & ~far)
    by, bx = ny[py, px] + a0, nx[py, px] + b0
    py, px = py + a0, px + b0
    ry, rx = 2 * by - py, 2 * bx - px
    ok = (ry >= 0) & (ry < valid.shape[0]) & (rx >= 0) & (rx < valid.shape[1])
    ok[ok] = valid[ry[ok], rx[ok]]
    # every source pixel is valid, so blocks filled earlier are never read back
    x[py, px] = x[np.where(ok, ry, by), np.where(ok, rx, bx)]
    fy, fx = np.nonzero(far)
    x[fy + a0, fx + b0] = fill


def local_mean(values: np.ndarray, valid: np.ndarray | None, radius: int) -> np.ndarray:
    """Mean of the valid values in the ``(2 radius + 1)^2`` box around each pixel.

    The box is cut at the array's border; a pixel whose box holds no valid value gets NaN.
    Sums are taken over summed-area tables in float64, so the result at a pixel depends only
    on the values within ``radius`` of it (up to rounding), wherever the array starts.

    Parameters
    ----------
    values : ndarray (h, w)
        Values (ignored where ``valid`` is False).
    valid : ndarray of bool (h, w) or None
        Pixels that count; None when all do.
    radius : int
        Half-width of the box, pixels (>= 1).

    Returns
    -------
    ndarray of float64 (h, w)
    """
    h, w = values.shape
    v = values.astype(np.float64)
    weight = np.ones((h, w), dtype=np.float64) if valid is None else valid.astype(np.float64)
    if valid is not None:
        v = np.where(valid, v, 0.0)

    def box(a: np.ndarray) -> np.ndarray:
        table = np.zeros((h + 1, w + 1), dtype=np.float64)
        np.cumsum(np.cumsum(a, axis=0), axis=1, out=table[1:, 1:])
        ys, xs = np.arange(h), np.arange(w)
        lo_y, hi_y = np.maximum(ys - radius, 0), np.minimum(ys + radius + 1, h)
        lo_x, hi_x = np.maximum(xs - radius, 0), np.minimum(xs + radius + 1, w)
        return (table[np.ix_(hi_y, hi_x)] - table[np.ix_(lo_y, hi_x)]
                - table[np.ix_(hi_y, lo_x)] + table[np.ix_(lo_y, lo_x)])

    count = box(weight)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0.5, box(v) / count, np.nan)


def flatten_gain(x: np.ndarray, valid: np.ndarray | None, radius: int) -> np.ndarray:
    """Divide every pixel by the mean brightness of the valid pixels around it, in place.

    The brightness of a pixel is the mean of its bands; each pixel is scaled by
    ``GAIN_LEVEL / max(local mean, GAIN_FLOOR)`` (the local mean over the
    ``(2 radius + 1)^2`` box, :func:`local_mean`) and clipped to ``[0, 1]``. What is left is
    contrast relative to the surroundings: slow changes of brightness (a survey line's gain,
    range fall-off, the bright band beside a sonar's nadir, uneven lighting) are taken out,
    texture and objects smaller than the box are kept. Pixels with no valid pixel in their
    box are left as they are.

    Parameters
    ----------
    x : ndarray (h, w, c)
        Unit intensities; changed in place.
    valid : ndarray of bool (h, w) or None
        Pixels that count towards the means; None when all do.
    radius : int
        Half-width of the box, pixels (>= 1).

    Returns
    -------
    ndarray
        ``x``.
    """
    mean = local_mean(x.mean(axis=2), valid, radius)
    gain = GAIN_LEVEL / np.maximum(np.nan_to_num(mean, nan=GAIN_LEVEL), GAIN_FLOOR)
    np.multiply(x, gain.astype(np.float32)[:, :, None], out=x)
    np.clip(x, 0.0, 1.0, out=x)
    return x


def to_unit_rgb(
    raw: np.ndarray,
    intensity: Intensity,
    valid: np.ndarray | None = None,
    mirror: int = 0,
    gain_radius: int = 0,
) -> np.ndarray:
    """Map raw pixels (h, w, 1 or 3) to float32 RGB in ``[0, 1]`` as the model sees them.

    NaN becomes 0. With ``gain_radius > 0`` the gain is flattened (:func:`flatten_gain`).
    Pixels where ``valid`` is False then become the fill value (``intensity.fill``, or
    :data:`GAIN_LEVEL` when the gain is flattened), or with ``mirror > 0`` the data mirrored
    across the nearest edge up to that many pixels from it (:func:`mirror_fill`).

    Parameters
    ----------
    raw : ndarray (h, w, 1 or 3)
        Raw pixels.
    intensity : Intensity
        The map of raw values onto ``[0, 1]``.
    valid : ndarray of bool (h, w), optional
        Pixels that hold data; None when all do.
    mirror : int
        Reach of the mirrored fill in pixels; 0 fills with the fill value.
    gain_radius : int
        Half-width in pixels of the box each pixel's brightness is divided by; 0 keeps the
        intensities as mapped. Only pixels at least this far from the array's border get
        what they would get in a larger array.

    Returns
    -------
    ndarray (h, w, 3)
        float32 RGB (gray models get luminance replicated on the three bands).
    """
    x = raw.astype(np.float32)
    scale = 1.0 / max(intensity.high - intensity.low, 1e-12)
    x = np.nan_to_num(np.clip((x - intensity.low) * scale, 0.0, 1.0), nan=0.0)
    fill = intensity.fill
    if gain_radius > 0:
        flatten_gain(x, valid, gain_radius)
        fill = GAIN_LEVEL
    if valid is not None:
        if mirror > 0:
            mirror_fill(x, valid, mirror, fill)
        else:
            x[~valid] = fill
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
