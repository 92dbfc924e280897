"""Synthetic sidescan-sonar mosaics of any size, rendered window by window.

A :class:`SonarScene` describes a mosaic of towed sidescan survey lines without storing any
pixel: each pixel is a pure function of its absolute coordinates and the seed. A window can
therefore be rendered on its own, and ``render(y0, y1, x0, x1)`` equals the same crop of any
larger render exactly, which makes mosaics of 20k x 20k pixels and more cheap to tile, to
write (:func:`~anomaly_dask.datasets.tiff_writer.write_tiff`) or to feed to Dask.

What a scene holds
------------------
- Survey lines along x, stacked in y (:mod:`.sonar_geometry`): each swath has a dark nadir
  gap along its wandering track, port (above) and starboard (below) sides fading with
  range, and ragged outer edges beyond which there is no data. Where swaths overlap, the
  pixel comes from the nearest track; between them there are gaps.
- A ground-fixed seabed (:mod:`.sonar_seabed`): sediment patches, two ripple systems set by
  the survey area (``site``), relief shading.
- Targets with acoustic shadows (:mod:`.sonar_targets`); :meth:`SonarScene.truth` marks
  body plus shadow.
- Multiplicative speckle, per-ping gain jitter and an electronic noise floor.

Why windows agree
-----------------
All noise is hashed value noise on lattices of absolute integer coordinates, interpolated
with elementwise float32 arithmetic (:mod:`.noise`). The per-pixel path uses lookup tables
and rational curves instead of transcendental functions (whose vectorised and scalar code
paths may differ in the last bit), and nothing reduces across a window.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import ParameterError
from .noise import F32, hash2, rayleigh_table, speckle_table, stream_key
from .sonar_geometry import SurveyLine, SwathGeometry, survey_lines, swath_geometry
from .sonar_seabed import RippleSet, range_gain, reflectivity, ripple_sets, sediments
from .sonar_targets import SonarTarget, overlap, place_targets, target_boxes, targets_in

__all__ = ["SonarScene", "make_scene_array"]

_SHADOW_LEVEL = 0.04  # reflectivity multiplier inside acoustic shadows
_WATER_LEVEL = 0.010  # mean return inside the nadir gap
_NOISE_FLOOR = 0.018  # electronic noise amplitude, everywhere on valid pixels
_DISPLAY_KNEE = 0.85  # intensity mapped to mid-grey by the display curve I / (I + knee)


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
        """Reject parameters that cannot describe a scene (:class:`ParameterError`)."""
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
        """Generator of one named stream of random constants (``seed`` defaults to the scene's)."""
        seed = self.seed if seed is None else seed
        return np.random.default_rng([seed & (2**63 - 1), stream_key(0, stream)])

    @cached_property
    def _lines(self) -> tuple[SurveyLine, ...]:
        """The survey lines crossing the mosaic, top to bottom."""
        return survey_lines(
            self._rng("lines"),
            self.seed,
            self.height,
            self.width,
            self.line_spacing,
            self.swath_halfwidth,
            self.nadir_width,
        )

    @cached_property
    def _ripple_sets(self) -> tuple[RippleSet, ...]:
        """The two ripple systems of the scene's survey area."""
        return ripple_sets(self._rng("ripples", self.site), self.ripple_wavelength)

    @property
    def _wobble(self) -> float:
        """Amplitude of the tracks' wander, pixels."""
        return 0.045 * self.line_spacing

    @property
    def _maxval(self) -> int:
        """Largest value of :attr:`dtype`."""
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

    def _geometry(self, ys: np.ndarray, xs: np.ndarray) -> SwathGeometry:
        """Swath geometry of the grid ``ys x xs``."""
        return swath_geometry(self._lines, ys, xs, self._wobble, self.nadir_width)

    # ---- targets ------------------------------------------------------------------------

    @cached_property
    def targets(self) -> tuple[SonarTarget, ...]:
        """The anomalies of the scene, placed from the seed on valid, non-nadir seabed."""
        n = self.n_objects
        if n is None:
            n = max(3, round(self.height * self.width / 1.5e6))
        return place_targets(
            n,
            self._rng("targets"),
            self._lines,
            height=self.height,
            width=self.width,
            object_size=self.object_size,
            wobble=self._wobble,
            nadir_limits=self.nadir_width,
            geometry=self._geometry,
        )

    @cached_property
    def _target_boxes(self) -> np.ndarray:
        """``(n, 4)`` int64 boxes ``(y0, y1, x0, x1)`` of :attr:`targets`."""
        return target_boxes(self.targets)

    def _targets_in(self, y0: int, y1: int, x0: int, x1: int) -> list[SonarTarget]:
        """Targets whose rasters intersect the window."""
        return targets_in(self.targets, self._target_boxes, y0, y1, x0, x1)

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
        refl = reflectivity(ys, xs, geo, self.seed, self.ripple_strength, self._ripple_sets)
        for t in self._targets_in(y0, y1, x0, x1):
            wr, wc, tr, tc = overlap(t, y0, y1, x0, x1)
            body = t.body[tr, tc]
            refl[wr, wc] = np.where(body > 0, body, refl[wr, wc])
            refl[wr, wc] *= np.where(t.shadow[tr, tc], F32(_SHADOW_LEVEL), F32(1))
        h = hash2(ys, np.arange(x0 - 1, x1 + 1), stream_key(self.seed, "speckle"))
        grains = speckle_table(float(self.speckle_looks))[h >> np.uint32(16)]
        # grains are elongated along track (the beam is wider than the pulse is long)
        speckle = F32(0.3) * grains[:, :-2] + F32(0.45) * grains[:, 1:-1] + F32(0.25) * grains[:, 2:]
        floor = rayleigh_table()[h[:, 1:-1] & np.uint32(0xFFFF)]
        inten = range_gain(geo.rho) * geo.gain * np.maximum(refl, F32(0)) * speckle
        inten = np.where(geo.nadir, F32(_WATER_LEVEL) * speckle, inten) + F32(_NOISE_FLOOR) * floor
        return self._quantize(inten, geo.valid)

    def _quantize(self, inten: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Display curve ``I / (I + knee)`` to the integer range, keeping nodata exclusive."""
        top = self._maxval
        v = inten / (inten + F32(_DISPLAY_KNEE))
        q = np.rint(v * F32(top - 1)).astype(np.int64) + 1  # 1 .. top
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
            wr, wc, tr, tc = overlap(t, y0, y1, x0, x1)
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
            return np.zeros((ys.size, xs.size), dtype=F32)
        return F32(2) * self._geometry(ys, xs).nadir_half

    def sediment(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Dominant sediment of each pixel of a window: uint8, 0 mud, 1 sand, 2 gravel
        (whatever the swaths; see :meth:`valid`)."""
        ys, xs = self._coords(y0, y1, x0, x1)
        mud, gravel = sediments(ys, xs, self.seed)
        out = np.where(gravel > 0.5, 2, np.where(mud > 0.5, 0, 1))
        return out.astype(np.uint8)


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
