"""Synthetic sidescan-sonar mosaics, rendered window by window.

A :class:`SonarScene` describes a mosaic of towed sidescan survey lines of any size. Nothing
is stored per pixel: every pixel is a pure function of its absolute coordinates and the seed,
so any window can be rendered on its own and ``render(y0, y1, x0, x1)`` equals the same crop
of a larger render exactly. That makes scenes of 20k x 20k pixels and more cheap to tile,
write (:func:`write_tiff`) or feed to Dask without ever materialising the whole image.

Layout
------
Survey lines run along the x axis (tracks are horizontal) and are stacked in y. Each line
covers a swath around its slowly wandering centre line (the track): a dark nadir gap (the
water column) along the centre, port (above) and starboard (below) sides whose intensity
falls off with range, and ragged outer edges beyond which there is no data. Neighbouring
swaths overlap in places and leave gaps in others; where they overlap, the pixel is taken
from the line whose track is nearest (the usual mosaicking rule).

Seabed
------
The seabed reflectivity is geo-referenced (independent of the lines): sediment patches (mud,
sand, gravel) with smooth boundaries, two sand-ripple systems (orientation and wavelength set
by the survey area, ``site``) that blend into each other over large areas, and a gentle relief whose shading flips between port and starboard. The
returns carry multiplicative speckle, per-ping gain jitter and an electronic noise floor.

Targets
-------
Compact bright objects (boulders, debris clusters, wreck-like hulls, elongated pipes/logs)
lie on valid seabed, away from the nadir, each casting a dark acoustic shadow away from the
track whose length grows with range. :meth:`SonarScene.truth` marks body plus shadow.

Determinism
-----------
Noise is hashed value noise on integer lattices of absolute coordinates, interpolated
separably with elementwise float32 arithmetic only. Transcendental functions (whose SIMD and
scalar code paths may differ in the last bit) are replaced by lookup tables and rational
curves on the per-pixel path, and no reduction runs across a window, so results do not
depend on the window.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ParameterError

__all__ = [
    "SonarScene",
    "SonarTarget",
    "iter_tiles",
    "make_scene_array",
    "write_tiff",
]

_F32 = np.float32
_TARGET_KINDS = ("boulder", "debris", "wreck", "elongated")
_TARGET_WEIGHTS = (0.35, 0.25, 0.15, 0.25)
_SHADOW_LEVEL = 0.04  # reflectivity multiplier inside acoustic shadows
_WATER_LEVEL = 0.010  # mean return inside the nadir gap
_NOISE_FLOOR = 0.018  # electronic noise amplitude, everywhere on valid pixels
_DISPLAY_KNEE = 0.85  # intensity mapped to mid-grey by the display curve I / (I + knee)
_GEO_KEY_PROJECTED = 1
_GEO_KEY_PIXEL_IS_AREA = 1
_BIGTIFF_BYTES = 2**31  # uncompressed size above which write_tiff writes a BigTIFF


# --------------------------------------------------------------------------------------
# Hashing and lattice noise
# --------------------------------------------------------------------------------------


def _mix32(h: np.ndarray) -> np.ndarray:
    """Avalanche a uint32 array (the "lowbias32" integer finaliser)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def _key(seed: int, *parts: str | int) -> int:
    """Derive a 32-bit stream key from the seed and names or numbers.

    Parameters
    ----------
    seed : int
        Scene seed (any Python int).
    *parts : str or int
        Stream names (hashed with CRC32, stable across runs) or integers.

    Returns
    -------
    int
        Key in ``[0, 2**32)``.
    """
    h = np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], dtype=np.uint32)
    acc = _mix32(h[:1] ^ _mix32(h[1:] + np.uint32(0x9E3779B9)))
    for part in parts:
        code = zlib.crc32(part.encode()) if isinstance(part, str) else int(part) & 0xFFFFFFFF
        acc = _mix32(acc ^ _mix32(np.array([code], dtype=np.uint32) + np.uint32(0x632BE5AB)))
    return int(acc[0])


def _u32(a: np.ndarray) -> np.ndarray:
    """Integer coordinates as uint32, wrapping negatives."""
    return (np.asarray(a, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _hash1(i: np.ndarray, key: int) -> np.ndarray:
    """Hash integer coordinates of one axis to uint32."""
    return _mix32(_u32(i) ^ np.uint32(key))


def _hash2(iy: np.ndarray, ix: np.ndarray, key: int) -> np.ndarray:
    """Hash an outer grid of integer coordinates to a ``(len(iy), len(ix))`` uint32 array."""
    hy = _mix32(_u32(iy) * np.uint32(0x9E3779B1) ^ np.uint32(key))
    hx = _hash1(ix, key ^ 0x5BD1E995)
    return _mix32(hy[:, None] ^ hx[None, :])


def _unit(h: np.ndarray) -> np.ndarray:
    """Map uint32 hashes to float32 values uniform in ``[-1, 1)``."""
    return (h >> np.uint32(8)).astype(_F32) * _F32(2.0 / (1 << 24)) - _F32(1.0)


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
    return cell.astype(np.int64), weight.astype(_F32)


def _noise1(xs: np.ndarray, scale: float, key: int) -> np.ndarray:
    """Smooth 1-D value noise in ``[-1, 1]`` at absolute coordinates ``xs``."""
    cell, w = _axis_lattice(xs, scale)
    v0 = _unit(_hash1(cell, key))
    v1 = _unit(_hash1(cell + 1, key))
    return v0 + (v1 - v0) * w


def _noise2(ys: np.ndarray, xs: np.ndarray, scale: float, key: int) -> np.ndarray:
    """Smooth 2-D value noise in ``[-1, 1]`` on the grid ``ys x xs`` (sorted, non-empty).

    The lattice values of the window are hashed once, interpolated along x for every lattice
    row, then along y, all elementwise, so each pixel's value depends on its coordinates only.
    """
    cy, wy = _axis_lattice(ys, scale)
    cx, wx = _axis_lattice(xs, scale)
    ly = np.arange(cy[0], cy[-1] + 2)
    lx = np.arange(cx[0], cx[-1] + 2)
    lattice = _unit(_hash2(ly, lx, key))
    jx = cx - lx[0]
    a = lattice[:, jx]
    rows = a + (lattice[:, jx + 1] - a) * wx
    jy = cy - ly[0]
    b = rows[jy]
    return b + (rows[jy + 1] - b) * wy[:, None]


def _fbm2(ys: np.ndarray, xs: np.ndarray, octaves: tuple[tuple[float, float], ...], key: int) -> np.ndarray:
    """Sum of value-noise octaves ``(scale, amplitude)``, normalised to about ``[-1, 1]``."""
    total = np.zeros((ys.size, xs.size), dtype=_F32)
    for i, (scale, amp) in enumerate(octaves):
        total += _F32(amp) * _noise2(ys, xs, scale, key ^ (0x1000193 * (i + 1) & 0xFFFFFFFF))
    return total * _F32(1.0 / sum(a for _, a in octaves))


def _smoothstep(edge0: float, edge1: float, v: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (either order), float32."""
    t = np.clip((v - _F32(edge0)) * _F32(1.0 / (edge1 - edge0)), _F32(0.0), _F32(1.0))
    return t * t * (_F32(3.0) - _F32(2.0) * t)


def _frac(v: np.ndarray) -> np.ndarray:
    """Fractional part, in ``[0, 1)``."""
    return v - np.floor(v)


def _lut(table: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Periodic table lookup with linear interpolation; ``u`` in ``[0, 1)``, table has n + 1 rows."""
    n = table.size - 1
    pos = u * _F32(n)
    i = np.minimum(pos.astype(np.int32), n - 1)
    t = pos - i.astype(_F32)
    lo = table[i]
    return lo + (table[i + 1] - lo) * t


@lru_cache(maxsize=8)
def _speckle_table(looks: float) -> np.ndarray:
    """Quantiles of unit-mean speckle amplitude for ``looks`` looks (65536 entries)."""
    from scipy.special import gammaincinv

    p = (np.arange(1 << 16, dtype=np.float64) + 0.5) / (1 << 16)
    amplitude = np.sqrt(gammaincinv(looks, p) / looks)
    return (amplitude / amplitude.mean()).astype(_F32)


@lru_cache(maxsize=1)
def _rayleigh_table() -> np.ndarray:
    """Quantiles of unit-mean Rayleigh amplitude (65536 entries), for the noise floor."""
    p = (np.arange(1 << 16, dtype=np.float64) + 0.5) / (1 << 16)
    amplitude = np.sqrt(-np.log1p(-p))
    return (amplitude / amplitude.mean()).astype(_F32)


@lru_cache(maxsize=1)
def _ripple_table() -> np.ndarray:
    """One period of an asymmetric (saw-tooth like) ripple profile, peak 1, 1025 entries."""
    u = np.linspace(0.0, 1.0, 1025)
    w = 2.0 * np.pi * u
    g = np.sin(w) + 0.42 * np.sin(2 * w) + 0.16 * np.sin(3 * w)
    return (g / np.abs(g).max()).astype(_F32)


# --------------------------------------------------------------------------------------
# Survey lines and swath geometry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    """One survey line (its random constants); profiles along x come from :func:`_profile`."""

    index: int
    y_base: float
    x_start: float
    x_end: float
    halfwidth: float
    nadir_half: float
    gain_port: float
    gain_starboard: float
    altitude: float
    key: int


@dataclass(frozen=True)
class _Profile:
    """Per-ping (per column x) quantities of one line, 1-D float32 arrays."""

    yc: np.ndarray
    range_port: np.ndarray
    range_starboard: np.ndarray
    nadir_half: np.ndarray
    ping_gain: np.ndarray
    inside: np.ndarray


def _profile(line: _Line, xs: np.ndarray, wobble: float, nadir_limits: tuple[float, float]) -> _Profile:
    """Evaluate a line's track, ranges, nadir width and gains at the pings ``xs``."""
    k = line.key
    yc = line.y_base + wobble * (_noise1(xs, 3100.0, k ^ 1) + _F32(0.35) * _noise1(xs, 850.0, k ^ 2))
    ranges = []
    for side in (3, 7):
        slow = _F32(line.halfwidth) * (_F32(1.0) + _F32(0.06) * _noise1(xs, 2600.0, k ^ side))
        ragged = (
            _F32(0.015 * line.halfwidth) * _noise1(xs, 70.0, k ^ (side + 1))
            + _F32(2.5) * _noise1(xs, 9.0, k ^ (side + 2))
            + _F32(1.5) * _unit(_hash1(xs, k ^ (side + 3)))
        )
        ranges.append(slow + ragged)
    half = _F32(line.nadir_half) * (_F32(1.0) + _F32(0.5) * _noise1(xs, 1700.0, k ^ 11))
    half = half + _F32(1.2) * _noise1(xs, 23.0, k ^ 12) + _F32(0.8) * _unit(_hash1(xs, k ^ 16))
    half = np.clip(half, _F32(nadir_limits[0] / 2), _F32(nadir_limits[1] / 2))
    gain = (
        _F32(1.0)
        + _F32(0.08) * _noise1(xs, 380.0, k ^ 13)
        + _F32(0.05) * _noise1(xs, 3.0, k ^ 14)
        + _F32(0.03) * _unit(_hash1(xs, k ^ 15))
    )
    inside = (xs >= line.x_start) & (xs < line.x_end)
    return _Profile(yc.astype(_F32), ranges[0], ranges[1], half, gain, inside)


@dataclass(frozen=True)
class _Geometry:
    """Per-pixel swath geometry of a window.

    Attributes
    ----------
    valid, nadir : numpy.ndarray
        bool, data present / inside the nadir gap.
    line : numpy.ndarray
        int32 index of the line the pixel is taken from, -1 where no data.
    side : numpy.ndarray
        float32, +1 starboard (below the track, larger y), -1 port.
    rho : numpy.ndarray
        float32 ground range fraction, 0 at the nadir edge and 1 at the swath edge.
    gain : numpy.ndarray
        float32 ping gain times side gain.
    nadir_half : numpy.ndarray
        float32 half-width of the nadir gap of the pixel's line at its ping, 0 where no data.
    """

    valid: np.ndarray
    nadir: np.ndarray
    line: np.ndarray
    side: np.ndarray
    rho: np.ndarray
    gain: np.ndarray
    nadir_half: np.ndarray


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SonarTarget:
    """One anomaly: a bright body and its acoustic shadow, as small rasters.

    Attributes
    ----------
    kind : str
        ``"boulder"``, ``"debris"``, ``"wreck"`` or ``"elongated"``.
    y0, x0 : int
        Absolute position of the rasters' top-left pixel.
    body : numpy.ndarray
        float32 reflectivity of the body (relative to sand = 1), 0 outside the body.
    shadow : numpy.ndarray
        bool, the acoustic shadow (never overlapping the body).
    line : int
        Survey line the target is seen from.
    side : int
        +1 starboard (shadow towards larger y), -1 port.
    """

    kind: str
    y0: int
    x0: int
    body: np.ndarray
    shadow: np.ndarray
    line: int
    side: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of body plus shadow, half-open."""
        return self.y0, self.y0 + self.body.shape[0], self.x0, self.x0 + self.body.shape[1]

    @property
    def mask(self) -> np.ndarray:
        """bool raster of body plus shadow (the ground truth)."""
        return (self.body > 0) | self.shadow


def _shape_boulder(yy: np.ndarray, xx: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Height map of an irregular rounded boulder."""
    a = size / 2 * rng.uniform(0.65, 1.0)
    b = a * rng.uniform(0.55, 1.0)
    ang = rng.uniform(0, np.pi)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    theta = np.arctan2(v, u)
    edge = 1.0 + sum(rng.uniform(-0.12, 0.12) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    q = np.hypot(u / a, v / b) / edge
    return np.where(q < 1, rng.uniform(0.3, 0.6) * size * np.sqrt(np.clip(1 - q * q, 0, 1)), 0.0)


def _shape_debris(yy: np.ndarray, xx: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Height map of a cluster of small pieces."""
    h = np.zeros_like(yy)
    for _ in range(rng.integers(3, 9)):
        cy, cx = rng.uniform(-size / 2.4, size / 2.4, 2)
        r = rng.uniform(1.5, max(2.5, size / 7))
        q = np.hypot(yy - cy, xx - cx) / r
        h = np.maximum(h, np.where(q < 1, rng.uniform(1.0, 2.5) * r * np.sqrt(np.clip(1 - q * q, 0, 1)), 0))
    return h


def _shape_wreck(yy: np.ndarray, xx: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Height map of a wreck-like hull: a tapered rectangle with a superstructure."""
    length = size
    half_w = length * rng.uniform(0.11, 0.2)
    ang = rng.uniform(0, np.pi)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    bow = np.clip((length / 2 - u) / (0.25 * length), 0.25, 1.0)
    hull = (np.abs(u) <= length / 2) & (np.abs(v) <= half_w * np.sqrt(bow))
    base = rng.uniform(3.0, 6.0)
    house = (np.abs(u - rng.uniform(-0.2, 0.1) * length) < 0.12 * length) & (np.abs(v) < 0.6 * half_w)
    return np.where(hull, base + np.where(house, rng.uniform(3.0, 7.0), 0.0), 0.0)


def _shape_elongated(yy: np.ndarray, xx: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Height map of a pipe, log or cable segment: a slightly bent capsule."""
    half_w = rng.uniform(1.3, 3.2)
    ang = rng.uniform(0, np.pi)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang) - rng.uniform(-1, 1) * (u / size) ** 2 * size * 0.15
    along = np.clip(np.abs(u) - size / 2, 0, None)
    q = np.hypot(along, v) / half_w
    return np.where(q < 1, 2 * half_w * rng.uniform(0.6, 1.0) * np.sqrt(np.clip(1 - q * q, 0, 1)), 0.0)


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "boulder": _shape_boulder,
    "debris": _shape_debris,
    "wreck": _shape_wreck,
    "elongated": _shape_elongated,
}


def _body_reflectivity(height: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """Reflectivity of a body seen from ``side``: bright facets facing the sonar, 0 elsewhere.

    Rows of ``height`` are in image order; the sonar lies towards smaller y for ``side=+1``.
    """
    body = height > 0
    facing = -side * np.gradient(height, axis=0)  # slope rising away from the sonar faces it
    oriented = body if side > 0 else body[::-1]
    depth = np.cumsum(oriented, axis=0) - 1.0
    depth = depth if side > 0 else depth[::-1]
    lead = 1.0 / (1.0 + (depth / 2.5) ** 2)
    level = rng.uniform(2.5, 5.0)
    refl = level * (0.55 + 0.8 * lead + 0.5 * np.tanh(facing)) * rng.uniform(0.8, 1.2, height.shape)
    return np.where(body, np.clip(refl, 0.4, None), 0.0).astype(_F32)


def _cast_shadow(
    height: np.ndarray, rows_range: np.ndarray, side: int, altitude: float, max_len: float
) -> np.ndarray:
    """Acoustic shadow behind a height map, away from the track.

    Parameters
    ----------
    height : numpy.ndarray
        Height map in pixels, rows in image order.
    rows_range : numpy.ndarray
        Ground range (distance to the track) of each row, pixels.
    side : int
        +1 if the shadow extends towards larger row indices, -1 otherwise.
    altitude : float
        Effective altitude of the towfish, pixels.
    max_len : float
        Longest shadow, pixels.

    Returns
    -------
    numpy.ndarray
        bool shadow mask, disjoint from the body.
    """
    h, r = (height, rows_range) if side > 0 else (height[::-1], rows_range[::-1])
    i = np.arange(h.shape[0], dtype=np.float64)[:, None]
    reach = np.where(h > 0, i + np.minimum(h * r[:, None] / altitude, max_len), -np.inf)
    reach = np.maximum.accumulate(reach, axis=0)
    shadow = (h <= 0) & (i <= reach)
    return shadow if side > 0 else shadow[::-1]


# --------------------------------------------------------------------------------------
# The scene
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SonarScene:
    """A synthetic sidescan-sonar mosaic of any size, rendered on demand window by window.

    Parameters
    ----------
    height, width : int
        Mosaic size in pixels.
    seed : int
        Seed of everything random; equal parameters give identical pixels.
    n_objects : int, optional
        Number of targets. Default: one per 1.5 Mpx, at least 3. Fewer are placed if the
        valid seabed has no room for them.
    dtype : {"uint8", "uint16"}
        Pixel type of :meth:`render`.
    nodata : int
        Value outside the swaths; valid pixels never take it.
    line_spacing : float
        Mean distance between neighbouring survey lines, pixels.
    swath_halfwidth : float
        Mean range of one side of a swath (track to outer edge), pixels.
    nadir_width : tuple of float
        Limits ``(min, max)`` of the nadir gap's full width, pixels.
    ripple_wavelength : float
        Mean sand-ripple wavelength, pixels.
    ripple_strength : float
        Relative contrast of the ripples (0 disables them).
    speckle_looks : float
        Equivalent number of looks of each speckle sample (smaller is grainier); the samples
        are then slightly correlated along track.
    object_size : tuple of float
        Range ``(min, max)`` of the target sizes (longest dimension), pixels.
    pixel_size : float
        Ground size of a pixel in metres (for the GeoTIFF georeference).
    origin : tuple of float
        Projected ``(easting, northing)`` of the top-left corner, metres.
    epsg : int
        EPSG code of the projected CRS (default: WGS 84 / UTM zone 31N).
    site : int, optional
        Seed of the survey area's seabed regime: the orientation, wavelength and visibility
        of its two ripple systems. Scenes with equal ``site`` and different ``seed`` are
        different survey lines over the same kind of seabed, as an anomaly-free training
        survey and the survey to inspect usually are. Default: ``seed``, so scenes with
        different seeds also have different ripple regimes.

    Attributes
    ----------
    targets : tuple of SonarTarget
        The anomalies, placed lazily (once) from the seed.

    Examples
    --------
    >>> scene = SonarScene(20_000, 20_000, seed=3)
    >>> tile = scene.render(4096, 5120, 8192, 9216)  # 1024 x 1024 uint8, nothing else rendered
    >>> mask = scene.truth(4096, 5120, 8192, 9216)
    """

    height: int
    width: int
    seed: int = 0
    n_objects: int | None = None
    dtype: str = "uint8"
    nodata: int = 0
    line_spacing: float = 860.0
    swath_halfwidth: float = 420.0
    nadir_width: tuple[float, float] = (4.0, 30.0)
    ripple_wavelength: float = 14.0
    ripple_strength: float = 0.35
    speckle_looks: float = 0.8
    object_size: tuple[float, float] = (10.0, 60.0)
    pixel_size: float = 0.1
    origin: tuple[float, float] = (430000.0, 5700000.0)
    epsg: int = 32631
    site: int | None = None

    def __post_init__(self) -> None:
        if int(self.height) < 1 or int(self.width) < 1:
            raise ParameterError(f"height and width must be >= 1, got {self.height} x {self.width}")
        if self.dtype not in ("uint8", "uint16"):
            raise ParameterError(f"dtype must be 'uint8' or 'uint16', got {self.dtype!r}")
        if not 0 <= int(self.nodata) <= np.iinfo(self.dtype).max:
            raise ParameterError(f"nodata {self.nodata} does not fit in {self.dtype}")
        if self.n_objects is not None and self.n_objects < 0:
            raise ParameterError(f"n_objects must be >= 0, got {self.n_objects}")
        if self.swath_halfwidth <= 0 or self.line_spacing <= 0:
            raise ParameterError("swath_halfwidth and line_spacing must be > 0")
        lo, hi = self.nadir_width
        if not 0 < lo <= hi < self.swath_halfwidth:
            raise ParameterError(
                f"nadir_width must be 0 < min <= max < swath_halfwidth, got {self.nadir_width}"
            )
        lo, hi = self.object_size
        if not 2 <= lo <= hi:
            raise ParameterError(f"object_size must be 2 <= min <= max, got {self.object_size}")
        if self.ripple_wavelength < 2 or self.speckle_looks <= 0 or self.ripple_strength < 0:
            raise ParameterError("ripple_wavelength must be >= 2, speckle_looks > 0, ripple_strength >= 0")

    # ---- random constants -------------------------------------------------------------

    def _rng(self, stream: str, seed: int | None = None) -> np.random.Generator:
        seed = self.seed if seed is None else seed
        return np.random.default_rng([seed & (2**63 - 1), _key(0, stream)])

    @cached_property
    def _lines(self) -> tuple[_Line, ...]:
        """The survey lines crossing the mosaic, top to bottom."""
        rng = self._rng("lines")
        lines = []
        y = rng.uniform(0.3, 0.7) * self.line_spacing
        k = 0
        while y - 1.5 * self.swath_halfwidth < self.height:
            span = rng.uniform(0.0, 0.05, 2) * self.width * (rng.random(2) < 0.6)
            lines.append(
                _Line(
                    index=k,
                    y_base=float(y),
                    x_start=float(span[0]),
                    x_end=float(self.width - span[1]),
                    halfwidth=float(self.swath_halfwidth * rng.uniform(0.92, 1.08)),
                    nadir_half=float(rng.uniform(*self.nadir_width) / 2),
                    gain_port=float(rng.uniform(0.85, 1.12)),
                    gain_starboard=float(rng.uniform(0.85, 1.12)),
                    altitude=float(rng.uniform(0.12, 0.2) * self.swath_halfwidth),
                    key=_key(self.seed, "line", k),
                )
            )
            y += self.line_spacing * rng.uniform(0.94, 1.06)
            k += 1
        return tuple(lines)

    @cached_property
    def _ripple_sets(self) -> tuple[tuple[float, float, float], ...]:
        """Two ripple systems ``(cycles/px along y, along x, visibility)``."""
        rng = self._rng("ripples", self.site)
        theta0 = rng.uniform(0.25, 0.75) * np.pi  # crest orientation mostly along track
        sets = []
        for theta in (theta0, theta0 + rng.choice([-1, 1]) * rng.uniform(0.2, 0.4) * np.pi):
            lam = self.ripple_wavelength * rng.uniform(0.8, 1.25)
            sets.append((np.sin(theta) / lam, np.cos(theta) / lam, 0.35 + 0.65 * abs(np.sin(theta))))
        return tuple(sets)

    @property
    def _wobble(self) -> float:
        return 0.045 * self.line_spacing

    @property
    def _maxval(self) -> int:
        return int(np.iinfo(self.dtype).max)

    # ---- windows ------------------------------------------------------------------------

    def _coords(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        """Validate a window and return its absolute row and column coordinates."""
        y0, y1, x0, x1 = (int(v) for v in (y0, y1, x0, x1))
        if not (0 <= y0 <= y1 <= self.height and 0 <= x0 <= x1 <= self.width):
            raise ParameterError(
                f"window y[{y0}:{y1}] x[{x0}:{x1}] is not inside the {self.height} x {self.width} scene"
            )
        return np.arange(y0, y1, dtype=np.int64), np.arange(x0, x1, dtype=np.int64)

    def _candidate_lines(self, y0: float, y1: float) -> list[_Line]:
        """Lines whose swath may reach rows ``[y0, y1)`` (a safe bound)."""
        reach = 1.35 * self._wobble + 10.0
        return [
            ln
            for ln in self._lines
            if ln.y_base - 1.15 * ln.halfwidth - reach < y1 and ln.y_base + 1.15 * ln.halfwidth + reach > y0
        ]

    def _geometry(self, ys: np.ndarray, xs: np.ndarray) -> _Geometry:
        """Swath geometry of the grid ``ys x xs``: nearest covering track wins."""
        shape = (ys.size, xs.size)
        yf = ys.astype(_F32)[:, None]
        best = np.full(shape, np.inf, dtype=_F32)
        line = np.full(shape, -1, dtype=np.int32)
        side = np.ones(shape, dtype=_F32)
        rng_max = np.ones(shape, dtype=_F32)
        nadir_half = np.zeros(shape, dtype=_F32)
        gain = np.ones(shape, dtype=_F32)
        for ln in self._candidate_lines(float(ys[0]), float(ys[-1]) + 1):
            p = _profile(ln, xs, self._wobble, self.nadir_width)
            d = yf - p.yc[None, :]
            r = np.abs(d)
            starboard = d >= 0
            reach = np.where(starboard, p.range_starboard[None, :], p.range_port[None, :])
            win = (r <= reach) & p.inside[None, :] & (r < best)
            best = np.where(win, r, best)
            line = np.where(win, ln.index, line)
            side = np.where(win, np.where(starboard, _F32(1), _F32(-1)), side)
            rng_max = np.where(win, reach, rng_max)
            nadir_half = np.where(win, p.nadir_half[None, :], nadir_half)
            side_gain = np.where(starboard, _F32(ln.gain_starboard), _F32(ln.gain_port))
            gain = np.where(win, side_gain * p.ping_gain[None, :], gain)
        valid = line >= 0
        dist = np.where(valid, best, _F32(0))
        rho = np.clip((dist - nadir_half) / np.maximum(rng_max - nadir_half, _F32(1)), _F32(0), _F32(1))
        nadir = valid & (dist < nadir_half)
        return _Geometry(valid, nadir, line, side, rho, gain, np.where(valid, nadir_half, _F32(0)))

    # ---- seabed -------------------------------------------------------------------------

    def _ripples(self, ys: np.ndarray, xs: np.ndarray, side: np.ndarray) -> np.ndarray:
        """Ripple relief as seen from ``side`` (saw-tooth profile mirrored by side), in [-1, 1]."""
        table = _ripple_table()
        out = []
        for i, (fy, fx, visibility) in enumerate(self._ripple_sets):
            py = _frac(ys.astype(np.float64) * fy).astype(_F32)
            px = _frac(xs.astype(np.float64) * fx).astype(_F32)
            warp = _F32(6.0) * _noise2(ys, xs, 700.0, _key(self.seed, "warp", i))
            warp += _F32(1.2) * _noise2(ys, xs, 170.0, _key(self.seed, "warp2", i))
            u = _frac(py[:, None] + px[None, :] + warp)
            u = np.where(side > 0, u, _F32(1) - u)
            u = np.minimum(u, _F32(0.99999994))
            out.append(_lut(table, u) * _F32(visibility))
        blend = _smoothstep(-0.3, 0.3, _noise2(ys, xs, 1500.0, _key(self.seed, "ripple-blend")))
        return out[0] + (out[1] - out[0]) * blend

    def _sediments(self, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights of mud and gravel (sand is the rest), float32 in [0, 1]."""
        octaves = ((1900.0, 1.0), (700.0, 0.5), (260.0, 0.25), (90.0, 0.14), (30.0, 0.07))
        s = _fbm2(ys, xs, octaves, _key(self.seed, "sed"))
        return _smoothstep(-0.2, -0.27, s), _smoothstep(0.3, 0.37, s)

    def _reflectivity(self, ys: np.ndarray, xs: np.ndarray, geo: _Geometry) -> np.ndarray:
        """Seabed backscatter (sand = 1) including sediments, ripples and relief shading."""
        w_mud, w_gravel = self._sediments(ys, xs)
        w_sand = _F32(1) - w_mud - w_gravel
        sand = _F32(1.0)
        if self.ripple_strength > 0:
            patch = _smoothstep(-0.25, 0.3, _noise2(ys, xs, 1100.0, _key(self.seed, "ripple-amp")))
            amp = _F32(self.ripple_strength) * patch * (_F32(0.45) + _F32(0.9) * geo.rho)
            sand = _F32(1.0) + amp * self._ripples(ys, xs, geo.side)
        gravel = _F32(1.5) * (
            _F32(1.0)
            + _F32(0.45) * _noise2(ys, xs, 4.0, _key(self.seed, "grain1"))
            + _F32(0.3) * _noise2(ys, xs, 11.0, _key(self.seed, "grain2"))
        )
        mud = _F32(0.5) * (_F32(1.0) + _F32(0.08) * _noise2(ys, xs, 40.0, _key(self.seed, "mud")))
        refl = w_mud * mud + w_sand * sand + w_gravel * gravel
        refl *= _F32(1.0) + _F32(0.12) * _noise2(ys, xs, 320.0, _key(self.seed, "bs"))
        relief = _F32(0.16) * _noise2(ys, xs, 450.0, _key(self.seed, "relief1"))
        relief += _F32(0.07) * _noise2(ys, xs, 110.0, _key(self.seed, "relief2"))
        return refl * (_F32(1.0) + geo.side * relief)

    @staticmethod
    def _range_gain(rho: np.ndarray) -> np.ndarray:
        """Residual TVG curve: bright near nadir, falling off towards far range."""
        near = _F32(0.95) / (_F32(1.0) + (rho * _F32(1.0 / 0.07)) ** 2)
        return (_F32(0.72) + near) * (_F32(1.0) - _F32(0.5) * rho * rho)

    # ---- targets ------------------------------------------------------------------------

    @cached_property
    def targets(self) -> tuple[SonarTarget, ...]:
        """The anomalies of the scene, placed from the seed on valid, non-nadir seabed."""
        n = self.n_objects
        if n is None:
            n = max(3, round(self.height * self.width / 1.5e6))
        rng = self._rng("targets")
        placed: list[SonarTarget] = []
        occupied: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
        lines = self._lines
        for _ in range(60 * n + 50):
            if len(placed) >= n or not lines:
                break
            target = self._propose_target(rng, lines[rng.integers(len(lines))])
            if target is not None and self._fits(target, occupied):
                placed.append(target)
        return tuple(placed)

    def _propose_target(self, rng: np.random.Generator, line: _Line) -> SonarTarget | None:
        """Draw one target seen from ``line`` (not yet checked against the scene)."""
        kind = str(rng.choice(_TARGET_KINDS, p=_TARGET_WEIGHTS))
        size = float(rng.uniform(*self.object_size))
        side = int(rng.choice([-1, 1]))
        xc = int(rng.integers(0, self.width))
        p = _profile(line, np.array([xc]), self._wobble, self.nadir_width)
        reach = float((p.range_starboard if side > 0 else p.range_port)[0])
        near = float(p.nadir_half[0]) + size
        far = reach - size
        if far <= near:
            return None
        yc = float(p.yc[0])
        rho = rng.uniform(0.08, 0.85)
        ycen = int(round(yc + side * (near + rho * (far - near))))
        half = int(np.ceil(size * 0.62)) + 2
        shadow_room = int(np.ceil(min(150.0, 1.0 * size * (abs(ycen - yc) + half) / line.altitude))) + 2
        top = ycen - half - (shadow_room if side < 0 else 0)
        bottom = ycen + half + 1 + (shadow_room if side > 0 else 0)
        yy, xx = np.mgrid[top - ycen : bottom - ycen, -half : half + 1].astype(np.float64)
        height = _SHAPES[kind](yy, xx, size, rng)
        if not (height > 0).any():
            return None
        rows_range = np.abs(np.arange(top, bottom) - yc)
        shadow = _cast_shadow(height, rows_range, side, line.altitude, shadow_room - 2)
        body = _body_reflectivity(height, side, rng)
        used = (body > 0) | shadow
        rr = np.flatnonzero(used.any(axis=1))
        cc = np.flatnonzero(used.any(axis=0))
        sl = (slice(rr[0], rr[-1] + 1), slice(cc[0], cc[-1] + 1))
        return SonarTarget(
            kind, top + int(rr[0]), xc - half + int(cc[0]), body[sl], shadow[sl], line.index, side
        )

    def _fits(
        self,
        target: SonarTarget,
        occupied: dict[tuple[int, int], list[tuple[int, int, int, int]]],
        margin: int = 4,
        cell: int = 256,
    ) -> bool:
        """Whether a target lies on valid, non-nadir seabed of its own line and side, apart.

        ``occupied`` maps ``cell x cell`` blocks to the margin-padded boxes already placed
        there; the target's box is added to it when it fits.
        """
        y0, y1, x0, x1 = target.bbox
        box = (y0 - margin, y1 + margin, x0 - margin, x1 + margin)
        y0, y1, x0, x1 = box
        if y0 < 0 or x0 < 0 or y1 > self.height or x1 > self.width:
            return False
        cells = [
            (cy, cx)
            for cy in range(y0 // cell, (y1 - 1) // cell + 1)
            for cx in range(x0 // cell, (x1 - 1) // cell + 1)
        ]
        for key in cells:
            for oy0, oy1, ox0, ox1 in occupied.get(key, ()):
                if oy0 < y1 and y0 < oy1 and ox0 < x1 and x0 < ox1:
                    return False
        geo = self._geometry(np.arange(y0, y1), np.arange(x0, x1))
        ok = geo.valid & ~geo.nadir & (geo.line == target.line) & (geo.side == target.side)
        if not ok.all():
            return False
        for key in cells:
            occupied.setdefault(key, []).append(box)
        return True

    @cached_property
    def _target_boxes(self) -> np.ndarray:
        boxes = [t.bbox for t in self.targets]
        return np.array(boxes, dtype=np.int64).reshape(-1, 4)

    def _targets_in(self, y0: int, y1: int, x0: int, x1: int) -> list[SonarTarget]:
        """Targets whose rasters intersect the window."""
        b = self._target_boxes
        hit = (b[:, 0] < y1) & (b[:, 1] > y0) & (b[:, 2] < x1) & (b[:, 3] > x0)
        return [self.targets[i] for i in np.flatnonzero(hit)]

    @staticmethod
    def _overlap(
        target: SonarTarget, y0: int, y1: int, x0: int, x1: int
    ) -> tuple[slice, slice, slice, slice]:
        """Slices ``(window rows, window cols, raster rows, raster cols)`` of the intersection."""
        ty0, ty1, tx0, tx1 = target.bbox
        a0, a1 = max(y0, ty0), min(y1, ty1)
        b0, b1 = max(x0, tx0), min(x1, tx1)
        return (
            slice(a0 - y0, a1 - y0),
            slice(b0 - x0, b1 - x0),
            slice(a0 - ty0, a1 - ty0),
            slice(b0 - tx0, b1 - tx0),
        )

    # ---- public rendering -----------------------------------------------------------------

    def render(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Render the pixels of a window.

        Parameters
        ----------
        y0, y1, x0, x1 : int
            Half-open window ``[y0, y1) x [x0, x1)`` inside the scene.

        Returns
        -------
        numpy.ndarray
            ``(y1 - y0, x1 - x0)`` array of :attr:`dtype`; :attr:`nodata` outside the swaths.
        """
        ys, xs = self._coords(y0, y1, x0, x1)
        out = np.full((ys.size, xs.size), self.nodata, dtype=self.dtype)
        if out.size == 0:
            return out
        geo = self._geometry(ys, xs)
        if not geo.valid.any():
            return out
        refl = self._reflectivity(ys, xs, geo)
        for t in self._targets_in(y0, y1, x0, x1):
            wr, wc, tr, tc = self._overlap(t, y0, y1, x0, x1)
            body = t.body[tr, tc]
            refl[wr, wc] = np.where(body > 0, body, refl[wr, wc])
            refl[wr, wc] *= np.where(t.shadow[tr, tc], _F32(_SHADOW_LEVEL), _F32(1))
        h = _hash2(ys, np.arange(x0 - 1, x1 + 1), _key(self.seed, "speckle"))
        grains = _speckle_table(float(self.speckle_looks))[h >> np.uint32(16)]
        # grains are elongated along track (the beam is wider than the pulse is long)
        speckle = _F32(0.3) * grains[:, :-2] + _F32(0.45) * grains[:, 1:-1] + _F32(0.25) * grains[:, 2:]
        floor = _rayleigh_table()[h[:, 1:-1] & np.uint32(0xFFFF)]
        inten = self._range_gain(geo.rho) * geo.gain * np.maximum(refl, _F32(0)) * speckle
        inten = np.where(geo.nadir, _F32(_WATER_LEVEL) * speckle, inten) + _F32(_NOISE_FLOOR) * floor
        return self._quantize(inten, geo.valid)

    def _quantize(self, inten: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Display curve ``I / (I + knee)`` to the integer range, keeping nodata exclusive."""
        top = self._maxval
        v = inten / (inten + _F32(_DISPLAY_KNEE))
        q = np.rint(v * _F32(top - 1)).astype(np.int64) + 1  # 1 .. top
        if 1 <= self.nodata:
            q = np.where(q == self.nodata, self.nodata + 1 if self.nodata < top else self.nodata - 1, q)
        return np.where(valid, q, self.nodata).astype(self.dtype)

    def truth(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Ground truth of a window: target bodies and their shadows.

        Parameters
        ----------
        y0, y1, x0, x1 : int
            Half-open window inside the scene.

        Returns
        -------
        numpy.ndarray
            bool array of the window's shape.
        """
        self._coords(y0, y1, x0, x1)
        out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for t in self._targets_in(y0, y1, x0, x1):
            wr, wc, tr, tc = self._overlap(t, y0, y1, x0, x1)
            out[wr, wc] |= t.mask[tr, tc]
        return out

    def valid(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """bool mask of a window, False where there is no data (value :attr:`nodata`)."""
        ys, xs = self._coords(y0, y1, x0, x1)
        if ys.size == 0 or xs.size == 0:
            return np.zeros((ys.size, xs.size), dtype=bool)
        return self._geometry(ys, xs).valid

    def nadir(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """bool mask of a window, True in the nadir gaps (water column) of the swaths."""
        ys, xs = self._coords(y0, y1, x0, x1)
        if ys.size == 0 or xs.size == 0:
            return np.zeros((ys.size, xs.size), dtype=bool)
        return self._geometry(ys, xs).nadir

    def nadir_gap_width(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Full width (pixels, across track) of the nadir gap of each pixel's survey line at
        its ping; float32, 0 where there is no data. Varies along a line."""
        ys, xs = self._coords(y0, y1, x0, x1)
        if ys.size == 0 or xs.size == 0:
            return np.zeros((ys.size, xs.size), dtype=_F32)
        return _F32(2) * self._geometry(ys, xs).nadir_half

    def sediment(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Dominant sediment of each pixel of a window: uint8, 0 mud, 1 sand, 2 gravel
        (whatever the swaths; see :meth:`valid`)."""
        ys, xs = self._coords(y0, y1, x0, x1)
        mud, gravel = self._sediments(ys, xs)
        out = np.where(gravel > 0.5, 2, np.where(mud > 0.5, 0, 1))
        return out.astype(np.uint8)


# --------------------------------------------------------------------------------------
# Convenience and files
# --------------------------------------------------------------------------------------


def make_scene_array(height: int, width: int, seed: int = 0, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Render a whole (small) scene at once.

    Parameters
    ----------
    height, width : int
        Scene size in pixels.
    seed : int
        Scene seed.
    **kw
        Other :class:`SonarScene` parameters.

    Returns
    -------
    image : numpy.ndarray
        ``(height, width)`` pixels.
    truth : numpy.ndarray
        ``(height, width)`` bool ground truth.
    """
    scene = SonarScene(height, width, seed, **kw)
    return scene.render(0, height, 0, width), scene.truth(0, height, 0, width)


def _tile_pixels(scene: SonarScene, kind: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels (``kind="image"``) or uint8 0/255 truth (``kind="truth"``) of one window."""
    if kind == "image":
        return scene.render(*box)
    return scene.truth(*box).astype(np.uint8) * np.uint8(255)


def iter_tiles(
    scene: SonarScene,
    tile: int = 512,
    kind: Literal["image", "truth"] = "image",
    on_tile: Callable[[int, int, np.ndarray], None] | None = None,
) -> Iterator[np.ndarray]:
    """Yield full ``(tile, tile)`` tiles of a scene in row-major order, edges padded.

    Parameters
    ----------
    scene : SonarScene
        The scene.
    tile : int
        Tile side in pixels.
    kind : {"image", "truth"}
        Pixels (:attr:`SonarScene.dtype`, padded with nodata) or truth (uint8 0/255, padded 0).
    on_tile : callable, optional
        Called as ``on_tile(y0, x0, pixels)`` with each unpadded tile, in order.

    Yields
    ------
    numpy.ndarray
        One tile.
    """
    if tile < 1:
        raise ParameterError(f"tile must be >= 1, got {tile}")
    if kind not in ("image", "truth"):
        raise ParameterError(f"kind must be 'image' or 'truth', got {kind!r}")
    pad_value = scene.nodata if kind == "image" else 0
    for y0 in range(0, scene.height, tile):
        y1 = min(y0 + tile, scene.height)
        for x0 in range(0, scene.width, tile):
            x1 = min(x0 + tile, scene.width)
            if kind == "image":
                pixels = scene.render(y0, y1, x0, x1)
            else:
                pixels = scene.truth(y0, y1, x0, x1).astype(np.uint8) * np.uint8(255)
            if on_tile is not None:
                on_tile(y0, x0, pixels)
            full = np.full((tile, tile), pad_value, dtype=pixels.dtype)
            full[: y1 - y0, : x1 - x0] = pixels
            yield full


def _geotiff_tags(scene: SonarScene) -> list[tuple[int, str, int, Any, bool]]:
    """GeoTIFF tags placing the mosaic in a projected CRS (north up, square pixels)."""
    citation = f"EPSG:{scene.epsg}|"
    keys = [
        (1, 1, 0, 4),  # header: version 1.1.0, 4 keys
        (1024, 0, 1, _GEO_KEY_PROJECTED),  # GTModelTypeGeoKey
        (1025, 0, 1, _GEO_KEY_PIXEL_IS_AREA),  # GTRasterTypeGeoKey
        (1026, 34737, len(citation), 0),  # GTCitationGeoKey -> GeoAsciiParamsTag
        (3072, 0, 1, scene.epsg),  # ProjectedCSTypeGeoKey
    ]
    directory = tuple(v for key in keys for v in key)
    easting, northing = scene.origin
    return [
        (33550, "d", 3, (scene.pixel_size, scene.pixel_size, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, easting, northing, 0.0), True),
        (34735, "H", len(directory), directory, True),
        (34737, "s", 0, citation, True),
    ]


def write_tiff(
    path: str | Path,
    scene: SonarScene,
    tile: int = 512,
    compression: str | None = "zlib",
    *,
    kind: Literal["image", "truth"] = "image",
    on_tile: Callable[[int, int, np.ndarray], None] | None = None,
) -> None:
    """Write a scene as a tiled GeoTIFF, tile by tile (the image is never held whole).

    Parameters
    ----------
    path : str or pathlib.Path
        Output file.
    scene : SonarScene
        The scene.
    tile : int
        Tile side, a multiple of 16.
    compression : str or None
        tifffile compression name (``"zlib"``, ``"zstd"``, ``"lzw"``, ...) or None.
    kind : {"image", "truth"}
        Write the pixels (with a ``GDAL_NODATA`` tag) or the ground truth (uint8 0/255).
    on_tile : callable, optional
        Called as ``on_tile(y0, x0, pixels)`` with each tile as it is written (e.g. to build a
        preview in the same pass).

    Notes
    -----
    A BigTIFF is written when the uncompressed pixels exceed 2 GiB (``_BIGTIFF_BYTES``). The georeference is a
    ModelPixelScale / ModelTiepoint pair with a GeoKey directory naming ``scene.epsg``.
    """
    import tifffile

    if tile < 16 or tile % 16:
        raise ParameterError(f"tile must be a positive multiple of 16, got {tile}")
    dtype = np.dtype(scene.dtype if kind == "image" else np.uint8)
    bigtiff = scene.height * scene.width * dtype.itemsize > _BIGTIFF_BYTES
    tags = _geotiff_tags(scene)
    if kind == "image":
        tags.append((42113, "s", 0, str(int(scene.nodata)), True))
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        tw.write(
            iter_tiles(scene, tile, kind, on_tile),
            shape=(scene.height, scene.width),
            dtype=dtype,
            tile=(tile, tile),
            compression=compression,
            photometric="minisblack",
            extratags=tags,
            metadata=None,
        )
