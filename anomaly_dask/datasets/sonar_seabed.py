"""Seabed backscatter of a synthetic sidescan-sonar mosaic.

The seabed is tied to the ground, not to the survey lines: mud, sand and gravel patches with
smooth boundaries, two sand-ripple systems (set by the survey area) blending into each other
over large areas, and a gentle relief whose shading flips between port and starboard. All of
it is evaluated per pixel from absolute coordinates with :mod:`.noise`.
"""

from __future__ import annotations

import numpy as np

from .noise import F32, fbm2, frac, lut, noise2, ripple_table, smoothstep, stream_key
from .sonar_geometry import SwathGeometry

__all__ = ["RippleSet", "range_gain", "reflectivity", "ripple_sets", "sediments"]

#: One ripple system: ``(cycles per pixel along y, along x, visibility)``.
RippleSet = tuple[float, float, float]


def ripple_sets(rng: np.random.Generator, ripple_wavelength: float) -> tuple[RippleSet, ...]:
    """Draw the two ripple systems of a survey area.

    Parameters
    ----------
    rng : numpy.random.Generator
        The scene's ``"ripples"`` stream (seeded by its site).
    ripple_wavelength : float
        Mean ripple wavelength, pixels.

    Returns
    -------
    tuple of RippleSet
        Two systems, crests mostly along track and crossing at an angle.
    """
    theta0 = rng.uniform(0.25, 0.75) * np.pi  # crest orientation mostly along track
    sets = []
    for theta in (theta0, theta0 + rng.choice([-1, 1]) * rng.uniform(0.2, 0.4) * np.pi):
        lam = ripple_wavelength * rng.uniform(0.8, 1.25)
        sets.append((np.sin(theta) / lam, np.cos(theta) / lam, 0.35 + 0.65 * abs(np.sin(theta))))
    return tuple(sets)


def _ripples(
    ys: np.ndarray, xs: np.ndarray, side: np.ndarray, sets: tuple[RippleSet, ...], seed: int
) -> np.ndarray:
    """Ripple relief seen from ``side`` (the lopsided profile mirrored by side), in [-1, 1]."""
    table = ripple_table()
    out = []
    for i, (fy, fx, visibility) in enumerate(sets):
        py = frac(ys.astype(np.float64) * fy).astype(F32)
        px = frac(xs.astype(np.float64) * fx).astype(F32)
        warp = F32(6.0) * noise2(ys, xs, 700.0, stream_key(seed, "warp", i))
        warp += F32(1.2) * noise2(ys, xs, 170.0, stream_key(seed, "warp2", i))
        u = frac(py[:, None] + px[None, :] + warp)
        u = np.where(side > 0, u, F32(1) - u)
        u = np.minimum(u, F32(0.99999994))
        out.append(lut(table, u) * F32(visibility))
    blend = smoothstep(-0.3, 0.3, noise2(ys, xs, 1500.0, stream_key(seed, "ripple-blend")))
    return out[0] + (out[1] - out[0]) * blend


def sediments(ys: np.ndarray, xs: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights of mud and of gravel on a grid (sand takes the rest).

    Parameters
    ----------
    ys, xs : numpy.ndarray
        Absolute row and column coordinates (1-D).
    seed : int
        Scene seed.

    Returns
    -------
    mud, gravel : numpy.ndarray
        ``(len(ys), len(xs))`` float32 weights in ``[0, 1]``.
    """
    octaves = ((1900.0, 1.0), (700.0, 0.5), (260.0, 0.25), (90.0, 0.14), (30.0, 0.07))
    s = fbm2(ys, xs, octaves, stream_key(seed, "sed"))
    return smoothstep(-0.2, -0.27, s), smoothstep(0.3, 0.37, s)


def reflectivity(
    ys: np.ndarray,
    xs: np.ndarray,
    geo: SwathGeometry,
    seed: int,
    ripple_strength: float,
    sets: tuple[RippleSet, ...],
) -> np.ndarray:
    """Seabed backscatter of a grid, sand = 1: sediments, ripples and relief shading.

    Parameters
    ----------
    ys, xs : numpy.ndarray
        Absolute row and column coordinates (1-D).
    geo : SwathGeometry
        Swath geometry of the grid (ripple contrast and shading depend on range and side).
    seed : int
        Scene seed.
    ripple_strength : float
        Relative ripple contrast; 0 leaves the sand flat.
    sets : tuple of RippleSet
        The area's ripple systems, from :func:`ripple_sets`.

    Returns
    -------
    numpy.ndarray
        ``(len(ys), len(xs))`` float32 reflectivity.
    """
    w_mud, w_gravel = sediments(ys, xs, seed)
    w_sand = F32(1) - w_mud - w_gravel
    sand = F32(1.0)
    if ripple_strength > 0:
        patch = smoothstep(-0.25, 0.3, noise2(ys, xs, 1100.0, stream_key(seed, "ripple-amp")))
        amp = F32(ripple_strength) * patch * (F32(0.45) + F32(0.9) * geo.rho)
        sand = F32(1.0) + amp * _ripples(ys, xs, geo.side, sets, seed)
    gravel = F32(1.5) * (
        F32(1.0)
        + F32(0.45) * noise2(ys, xs, 4.0, stream_key(seed, "grain1"))
        + F32(0.3) * noise2(ys, xs, 11.0, stream_key(seed, "grain2"))
    )
    mud = F32(0.5) * (F32(1.0) + F32(0.08) * noise2(ys, xs, 40.0, stream_key(seed, "mud")))
    refl = w_mud * mud + w_sand * sand + w_gravel * gravel
    refl *= F32(1.0) + F32(0.12) * noise2(ys, xs, 320.0, stream_key(seed, "bs"))
    relief = F32(0.16) * noise2(ys, xs, 450.0, stream_key(seed, "relief1"))
    relief += F32(0.07) * noise2(ys, xs, 110.0, stream_key(seed, "relief2"))
    return refl * (F32(1.0) + geo.side * relief)


def range_gain(rho: np.ndarray) -> np.ndarray:
    """Residual time-varied gain: bright near the nadir, falling off towards far range.

    Parameters
    ----------
    rho : numpy.ndarray
        float32 ground range fraction (0 at the nadir edge, 1 at the swath edge).

    Returns
    -------
    numpy.ndarray
        float32 gain, shaped like ``rho``.
    """
    near = F32(0.95) / (F32(1.0) + (rho * F32(1.0 / 0.07)) ** 2)
    return (F32(0.72) + near) * (F32(1.0) - F32(0.5) * rho * rho)
