"""Deterministic pseudo-random fields for the synthetic generators.

Every value here is a pure function of integer coordinates and a 32-bit stream key: integer
hashes, value noise on hashed lattices (interpolated separably with elementwise float32
arithmetic), and lookup tables that replace transcendental functions on the per-pixel path.
Nothing reduces across a window, so a window's values never depend on its extent.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

__all__ = [
    "F32",
    "fbm2",
    "frac",
    "hash1",
    "hash2",
    "lut",
    "mix32",
    "noise1",
    "noise2",
    "rayleigh_table",
    "ripple_table",
    "smoothstep",
    "speckle_table",
    "stream_key",
    "unit",
]

F32 = np.float32


def mix32(h: np.ndarray) -> np.ndarray:
    """Scramble the bits of a uint32 array (the "lowbias32" finaliser).

    Parameters
    ----------
    h : numpy.ndarray
        uint32 values.

    Returns
    -------
    numpy.ndarray
        uint32 array of the same shape.
    """
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def stream_key(seed: int, *parts: str | int) -> int:
    """Derive the 32-bit key of one random stream from a seed and its names or numbers.

    Parameters
    ----------
    seed : int
        Scene seed (any Python int; its low 64 bits are used).
    *parts : str or int
        Stream names (hashed with CRC32, so stable across runs) or integers.

    Returns
    -------
    int
        Key in ``[0, 2**32)``.
    """
    h = np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], dtype=np.uint32)
    acc = mix32(h[:1] ^ mix32(h[1:] + np.uint32(0x9E3779B9)))
    for part in parts:
        code = zlib.crc32(part.encode()) if isinstance(part, str) else int(part) & 0xFFFFFFFF
        acc = mix32(acc ^ mix32(np.array([code], dtype=np.uint32) + np.uint32(0x632BE5AB)))
    return int(acc[0])


def _u32(a: np.ndarray) -> np.ndarray:
    """Integer coordinates as uint32, negatives wrapped modulo 2**32."""
    return (np.asarray(a, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)


def hash1(i: np.ndarray, key: int) -> np.ndarray:
    """Hash integer coordinates along one axis.

    Parameters
    ----------
    i : numpy.ndarray
        Integer coordinates.
    key : int
        Stream key.

    Returns
    -------
    numpy.ndarray
        uint32 hashes, shaped like ``i``.
    """
    return mix32(_u32(i) ^ np.uint32(key))


def hash2(iy: np.ndarray, ix: np.ndarray, key: int) -> np.ndarray:
    """Hash the outer grid of two 1-D integer coordinate vectors.

    Parameters
    ----------
    iy, ix : numpy.ndarray
        Row and column coordinates (1-D).
    key : int
        Stream key.

    Returns
    -------
    numpy.ndarray
        ``(len(iy), len(ix))`` uint32 hashes.
    """
    hy = mix32(_u32(iy) * np.uint32(0x9E3779B1) ^ np.uint32(key))
    hx = hash1(ix, key ^ 0x5BD1E995)
    return mix32(hy[:, None] ^ hx[None, :])


def unit(h: np.ndarray) -> np.ndarray:
    """Map uint32 hashes to float32 values spread uniformly over ``[-1, 1)``."""
    return (h >> np.uint32(8)).astype(F32) * F32(2.0 / (1 << 24)) - F32(1.0)


def _axis_lattice(coords: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice cell and quintic-faded weight of each coordinate along one axis.

    Parameters
    ----------
    coords : numpy.ndarray
        Absolute integer pixel coordinates (1-D).
    scale : float
        Lattice spacing in pixels.

    Returns
    -------
    cell : numpy.ndarray
        int64 index of the lattice node at or below each coordinate.
    weight : numpy.ndarray
        float32 interpolation weight of the next node, in ``[0, 1)``.
    """
    f = coords.astype(np.float64) / scale
    cell = np.floor(f)
    t = f - cell
    weight = t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
    return cell.astype(np.int64), weight.astype(F32)


def noise1(xs: np.ndarray, scale: float, key: int) -> np.ndarray:
    """Smooth 1-D value noise in ``[-1, 1]``.

    Parameters
    ----------
    xs : numpy.ndarray
        Absolute integer coordinates (1-D).
    scale : float
        Lattice spacing in pixels (the feature size).
    key : int
        Stream key.

    Returns
    -------
    numpy.ndarray
        float32 noise at ``xs``.
    """
    cell, w = _axis_lattice(xs, scale)
    v0 = unit(hash1(cell, key))
    v1 = unit(hash1(cell + 1, key))
    return v0 + (v1 - v0) * w


def noise2(ys: np.ndarray, xs: np.ndarray, scale: float, key: int) -> np.ndarray:
    """Smooth 2-D value noise in ``[-1, 1]`` on the grid ``ys x xs``.

    The window's lattice values are hashed once, interpolated along x for each lattice row
    and then along y, all elementwise, so a pixel's value depends on its coordinates only.

    Parameters
    ----------
    ys, xs : numpy.ndarray
        Sorted, non-empty absolute integer coordinates (1-D).
    scale : float
        Lattice spacing in pixels.
    key : int
        Stream key.

    Returns
    -------
    numpy.ndarray
        ``(len(ys), len(xs))`` float32 noise.
    """
    cy, wy = _axis_lattice(ys, scale)
    cx, wx = _axis_lattice(xs, scale)
    ly = np.arange(cy[0], cy[-1] + 2)
    lx = np.arange(cx[0], cx[-1] + 2)
    lattice = unit(hash2(ly, lx, key))
    jx = cx - lx[0]
    a = lattice[:, jx]
    rows = a + (lattice[:, jx + 1] - a) * wx
    jy = cy - ly[0]
    b = rows[jy]
    return b + (rows[jy + 1] - b) * wy[:, None]


def fbm2(ys: np.ndarray, xs: np.ndarray, octaves: tuple[tuple[float, float], ...], key: int) -> np.ndarray:
    """Weighted sum of :func:`noise2` octaves, scaled back to about ``[-1, 1]``.

    Parameters
    ----------
    ys, xs : numpy.ndarray
        Grid coordinates, as for :func:`noise2`.
    octaves : tuple of (float, float)
        ``(scale, amplitude)`` of each octave.
    key : int
        Stream key; each octave uses a key derived from it.

    Returns
    -------
    numpy.ndarray
        ``(len(ys), len(xs))`` float32 field.
    """
    total = np.zeros((ys.size, xs.size), dtype=F32)
    for i, (scale, amp) in enumerate(octaves):
        total += F32(amp) * noise2(ys, xs, scale, key ^ (0x1000193 * (i + 1) & 0xFFFFFFFF))
    return total * F32(1.0 / sum(a for _, a in octaves))


def smoothstep(edge0: float, edge1: float, v: np.ndarray) -> np.ndarray:
    """Hermite step, float32: 0 at ``edge0``, 1 at ``edge1`` (the edges in either order)."""
    t = np.clip((v - F32(edge0)) * F32(1.0 / (edge1 - edge0)), F32(0.0), F32(1.0))
    return t * t * (F32(3.0) - F32(2.0) * t)


def frac(v: np.ndarray) -> np.ndarray:
    """Fractional part of ``v``, in ``[0, 1)``."""
    return v - np.floor(v)


def lut(table: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Look up a periodic table with linear interpolation.

    Parameters
    ----------
    table : numpy.ndarray
        ``n + 1`` float32 samples of one period, the last equal to the first.
    u : numpy.ndarray
        float32 phases in ``[0, 1)``.

    Returns
    -------
    numpy.ndarray
        Interpolated values, shaped like ``u``.
    """
    n = table.size - 1
    pos = u * F32(n)
    i = np.minimum(pos.astype(np.int32), n - 1)
    t = pos - i.astype(F32)
    lo = table[i]
    return lo + (table[i + 1] - lo) * t


@lru_cache(maxsize=8)
def speckle_table(looks: float) -> np.ndarray:
    """65536 quantiles of unit-mean speckle amplitude with ``looks`` equivalent looks."""
    from scipy.special import gammaincinv

    p = (np.arange(1 << 16, dtype=np.float64) + 0.5) / (1 << 16)
    amplitude = np.sqrt(gammaincinv(looks, p) / looks)
    return (amplitude / amplitude.mean()).astype(F32)


@lru_cache(maxsize=1)
def rayleigh_table() -> np.ndarray:
    """65536 quantiles of unit-mean Rayleigh amplitude (the electronic noise floor)."""
    p = (np.arange(1 << 16, dtype=np.float64) + 0.5) / (1 << 16)
    amplitude = np.sqrt(-np.log1p(-p))
    return (amplitude / amplitude.mean()).astype(F32)


@lru_cache(maxsize=1)
def ripple_table() -> np.ndarray:
    """One period (1025 samples, peak 1) of a lopsided, saw-tooth-like ripple profile."""
    u = np.linspace(0.0, 1.0, 1025)
    w = 2.0 * np.pi * u
    g = np.sin(w) + 0.42 * np.sin(2 * w) + 0.16 * np.sin(3 * w)
    return (g / np.abs(g).max()).astype(F32)
