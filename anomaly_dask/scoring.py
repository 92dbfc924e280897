"""Scoring one chunk: pure array work on one worker, no Dask.

A *unit* is one chunk (a :class:`~anomaly_dask.grid.Window`) of one image. The
:class:`Extractor` (backbone, feature configuration, intensity map) reads a unit's window
plus halo, runs the backbone and turns its tiles into features, pixel scores or a
calibration sample; :func:`render_chunk` turns a chunk's scores into its mask and overlay.
:mod:`anomaly_dask.compute` ships these to the workers and streams their results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibration import DISTANCE_EDGES, Calibration, distance_classes
from .dictionary import Dictionary
from .features import FeatureConfig, tile_features
from .grid import (
    Runs,
    TileGrid,
    Window,
    chunk_windows,
    expand_runs,
    lattice_floor,
    masked_box_mean,
    nearest_tiles,
    nodata_distance,
    owns_tiles,
    pixel_runs,
    pixel_scores_from_tiles,
    tile_fractions,
    tile_means,
    tiles_covering,
)
from .intensity import Intensity, to_unit_rgb
from .io import ImageSource, read_window, valid_pixels
from .outputs import display_rgb, overlay_image

__all__ = [
    "MIRROR_REACH",
    "Extractor",
    "Rendering",
    "Unit",
    "calibrate_by_runs",
    "pixel_sample",
    "plan_units",
    "redraw_chunk",
    "render_chunk",
    "subsample",
]


#: Pixels of no-data next to data filled with the data mirrored across the edge (see
#: :func:`~anomaly_dask.intensity.mirror_fill`); windows are read this much wider, twice.
MIRROR_REACH = 32


@dataclass(frozen=True)
class Unit:
    """One chunk of one image."""

    source: ImageSource
    grid: TileGrid
    window: Window


def plan_units(source: ImageSource, grid: TileGrid, chunk: int, owners: bool = False) -> list[Unit]:
    """The chunks of an image, row-major: all of them, or (``owners=True``, for training)
    only those that own tiles."""
    return [Unit(source, grid, w) for row in chunk_windows(grid, chunk) for w in row if not owners or owns_tiles(w)]


def _axis_window(
    lo: int, hi: int, stride: int, tile: int, halo: int, lattice: int
) -> tuple[int, int, int]:
    """Pixel span read for tiles ``[lo, hi)`` on one axis: (start, stop, first tile offset)."""
    start = lattice_floor(lo * stride - halo, lattice)
    stop = (hi - 1) * stride + tile + halo
    stop = start + -(-(stop - start) // lattice) * lattice
    return start, stop, lo * stride - start


@dataclass(frozen=True, eq=False)
class ChunkFeatures:
    """What the backbone gives for one chunk (:meth:`Extractor.chunk_features`).

    Attributes
    ----------
    features : ndarray (r, c, D)
        Features of the tiles covering the chunk's extent.
    valid_fraction : ndarray (r, c) or None
        Share of valid pixels per tile; None when the window holds no no-data.
    raw : ndarray (h, w, channels)
        The raw window read (see :meth:`Extractor.features`).
    origin : (int, int)
        Image position of ``raw[0, 0]``.
    extent : (y0, y1, x0, x1)
        The chunk plus :meth:`Extractor.edge_reach`, clipped to the image.
    first_tile : (int, int)
        Grid row and column of ``features[0, 0]``.
    """

    features: np.ndarray
    valid_fraction: np.ndarray | None
    raw: np.ndarray
    origin: tuple[int, int]
    extent: tuple[int, int, int, int]
    first_tile: tuple[int, int]


@dataclass(frozen=True, eq=False)
class Extractor:
    """Backbone, feature configuration and intensity map: pixels of a unit to tile features.

    Scattered to the cluster once per job; tasks receive its future.

    Attributes
    ----------
    nodata : float, optional
        No-data value overriding each image's own (NaN is always no-data).
    min_valid : float
        Tiles with a smaller fraction of valid pixels are left out of training and
        validation, and weigh nothing in a valid pixel's score.
    mirror : int
        Reach of the mirrored no-data fill, pixels.
    gain_radius : int
        Half-width of the box each pixel's brightness is divided by before the backbone
        (:func:`~anomaly_dask.intensity.flatten_gain`); 0 leaves intensities as mapped.
    """

    backbone: Any
    config: FeatureConfig
    intensity: Intensity
    nodata: float | None = None
    min_valid: float = 0.5
    mirror: int = MIRROR_REACH
    gain_radius: int = 0

    def _read(
        self, unit: Unit, rows: tuple[int, int], cols: tuple[int, int]
    ) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int]]:
        """Raw window for tiles ``rows x cols`` plus ``2 * mirror + gain_radius`` px on every side."""
        g = unit.grid
        lattice, halo = self.config.lattice(self.backbone), self.config.halo(self.backbone)
        y0, y1, oy = _axis_window(*rows, g.stride_h, g.tile_h, halo, lattice)
        x0, x1, ox = _axis_window(*cols, g.stride_w, g.tile_w, halo, lattice)
        m = 2 * self.mirror + self.gain_radius
        return read_window(unit.source, y0 - m, y1 + m, x0 - m, x1 + m), (y0, y1, x0, x1), (oy, ox)

    def edge_reach(self, grid: TileGrid) -> int:
        """Pixels a valid pixel that no tile wholly on data covers looks for covered ones."""
        return max(grid.tile_h, grid.tile_w) // 2

    def distance_edges(self, grid: TileGrid) -> np.ndarray:
        """Boundaries of the distance classes of a chunk's pixels (see
        :func:`~anomaly_dask.calibration.distance_classes`), pixels: :data:`DISTANCE_EDGES`
        tiles, less those farther than every window read for a chunk reaches past it."""
        reach = self.edge_reach(grid) + self.config.halo(self.backbone) + 2 * self.mirror
        tile = min(grid.tile_h, grid.tile_w)
        return np.asarray([e * tile for e in DISTANCE_EDGES if e * tile <= reach], dtype=np.float32)

    def features(
        self, unit: Unit, rows: tuple[int, int], cols: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, tuple[int, int]]:
        """Features of tiles ``rows x cols`` of the unit's image.

        Returns
        -------
        features : ndarray (r, c, D)
        valid_fraction : ndarray (r, c) or None
            Share of valid pixels per tile; None when the window holds no no-data.
        raw : ndarray (h, w, channels)
            The raw window: the tiles plus the backbone's halo, plus ``2 * mirror`` pixels
            for the no-data fill (the gain's margin, also read, is not returned).
        origin : (int, int)
            Image position of ``raw[0, 0]``.
        """
        read, (y0, y1, x0, x1), offset = self._read(unit, rows, cols)
        n = (rows[1] - rows[0], cols[1] - cols[0])
        r, m = self.gain_radius, 2 * self.mirror
        # the gain is flattened on the whole read, no-data filled on it less the gain's margin,
        # so that what a pixel gets does not depend on the chunk
        wide = read[r : read.shape[0] - r, r : read.shape[1] - r]
        crop = (slice(m, m + y1 - y0), slice(m, m + x1 - x0))
        inner = (slice(r + m, r + m + y1 - y0), slice(r + m, r + m + x1 - x0))
        read_valid = valid_pixels(read, self.nodata if self.nodata is not None else unit.source.nodata)
        fraction = None
        if read_valid is None:
            pixels = to_unit_rgb(read, self.intensity, gain_radius=r)[inner] if r else to_unit_rgb(wide[crop], self.intensity)
        else:
            pixels = to_unit_rgb(read, self.intensity, read_valid, self.mirror, r)[inner]
            fraction = tile_fractions(read_valid[inner], offset, n, unit.grid)
        feats = tile_features(self.backbone, self.config, pixels, offset, n, unit.grid)
        return feats, fraction, wide, (y0 - m, x0 - m)

    def owned(self, unit: Unit) -> np.ndarray:
        """Features (n, D) of the tiles a unit owns, less those mostly in no-data."""
        f, fraction, _, _ = self.features(unit, unit.window.own_rows, unit.window.own_cols)
        f = f.reshape(-1, f.shape[-1])
        if fraction is None:
            return f
        return f[fraction.ravel() >= self.min_valid]

    def chunk_features(self, unit: Unit) -> ChunkFeatures:
        """The tile features :meth:`pixel_scores` needs for a unit's chunk (the backbone's
        part of its work, which the dictionary does not enter)."""
        g = unit.grid
        w = unit.window
        reach = self.edge_reach(g)
        ext = (max(0, w.y0 - reach), min(g.height, w.y1 + reach), max(0, w.x0 - reach), min(g.width, w.x1 + reach))
        rows, cols = tiles_covering(g, ext)
        f, fraction, raw, origin = self.features(unit, rows, cols)
        return ChunkFeatures(f, fraction, raw, origin, ext, (rows[0], cols[0]))

    def pixel_scores(
        self, unit: Unit, dictionary: Dictionary, n_neighbors: int, calibrated: bool = True,
        features: ChunkFeatures | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Pixel scores of a unit's chunk (NaN on no-data), its raw pixels, each pixel's
        distance to no-data and nearest centroid.

        A pixel's raw score is the mean score of the tiles covering it. Where the window
        holds no-data, a valid pixel takes the mean score of the tiles wholly on data that
        cover it; a pixel no such tile covers (within a stride or so of no-data) takes the
        mean of the covered pixels within :meth:`edge_reach` of it, so that tiles partly
        filled in are not what judges it; only where there are none (slivers of data) do
        tiles mostly on data count. With ``calibrated`` and a calibrated dictionary, raw
        scores are then mapped through the dictionary's calibration (see
        :mod:`anomaly_dask.calibration`) by each pixel's nearest centroid and distance to
        no-data. ``features``, when given, are the unit's :meth:`chunk_features`
        computed beforehand.

        Returns
        -------
        scores : ndarray of float32 (h, w)
        raw : ndarray (h, w, channels)
        distance : ndarray of float32 (h, w) or None
            Distance to the nearest no-data pixel, capped at the largest distance class
            boundary; None when there is none that near.
        labels : ndarray of int (h, w)
            Nearest centroid of the tile centred nearest each pixel.
        """
        w = unit.window
        g = unit.grid
        reach = self.edge_reach(g)
        cf = self.chunk_features(unit) if features is None else features
        f, fraction, raw, (oy, ox), ext = cf.features, cf.valid_fraction, cf.raw, cf.origin, cf.extent
        r0, c0 = cf.first_tile
        chunk_raw = raw[w.y0 - oy : w.y1 - oy, w.x0 - ox : w.x1 - ox]
        tiles, tile_labels = dictionary.score_and_label(f, n_neighbors)
        iy = nearest_tiles(w.y0, w.y1, g.stride_h, g.tile_h, g.n_rows) - r0
        ix = nearest_tiles(w.x0, w.x1, g.stride_w, g.tile_w, g.n_cols) - c0
        labels = tile_labels[np.ix_(iy, ix)]
        calibration = dictionary.calibration if calibrated else None
        if fraction is None:
            # no no-data near: a pixel's score depends only on its covering and nearest tiles,
            # so it is computed (and calibrated) once per run of alike pixels
            ry = pixel_runs(w.y0, w.y1, g.stride_h, g.tile_h, g.n_rows)
            rx = pixel_runs(w.x0, w.x1, g.stride_w, g.tile_w, g.n_cols)
            scores = tile_means(tiles, g, cf.first_tile, w.y0 + ry.first, w.x0 + rx.first)
            if calibration is not None:
                scores = calibration.apply(scores, tile_labels[np.ix_(iy[ry.first], ix[rx.first])], None)
            return expand_runs(scores, ry, rx), chunk_raw, None, labels
        full = fraction >= 1.0
        origin = cf.first_tile
        on_data = pixel_scores_from_tiles(tiles, g, origin, ext, full.astype(np.float64))
        covered = pixel_scores_from_tiles(full.astype(np.float32), g, origin, ext) > 0
        inner = (w.y0 - ext[0], w.y0 - ext[0] + w.shape[0], w.x0 - ext[2], w.x0 - ext[2] + w.shape[1])
        crop = (slice(inner[0], inner[1]), slice(inner[2], inner[3]))
        scores = on_data[crop].astype(np.float32)
        uy, ux = np.nonzero(~covered[crop])  # the pixels no tile wholly on data covers
        if len(uy):
            near, count = masked_box_mean(on_data, covered, reach, at=(uy + inner[0], ux + inner[2]))
            partial = (fraction >= self.min_valid).astype(np.float64)
            sliver = pixel_scores_from_tiles(tiles, g, origin, (w.y0, w.y1, w.x0, w.x1), partial)[uy, ux]
            scores[uy, ux] = np.where(count > 0, near, sliver)
        wide_valid = valid_pixels(raw, self.nodata if self.nodata is not None else unit.source.nodata)
        edges = self.distance_edges(g) if dictionary.calibration is None else dictionary.calibration.distance_edges
        box = (w.y0 - oy, w.y1 - oy, w.x0 - ox, w.x1 - ox)
        distance = nodata_distance(wide_valid, box, float(edges[0])) if len(edges) else None
        if calibration is not None:
            ry = pixel_runs(w.y0, w.y1, g.stride_h, g.tile_h, g.n_rows)
            rx = pixel_runs(w.x0, w.x1, g.stride_w, g.tile_w, g.n_cols)
            scores = calibrate_by_runs(calibration, scores, labels, distance, ry, rx)
        scores[~wide_valid[box[0] : box[1], box[2] : box[3]]] = np.nan
        return scores, chunk_raw, distance, labels


def calibrate_by_runs(
    calibration: Calibration, scores: np.ndarray, labels: np.ndarray, distance: np.ndarray | None,
    rows: Runs, cols: Runs,
) -> np.ndarray:
    """``calibration.apply(scores, labels, distance)``, computed once per block of
    :func:`~anomaly_dask.grid.pixel_runs` runs for the pixels that agree with their block's
    first pixel in raw score, centroid and distance class (away from no-data, all of them),
    and pixel by pixel for the others: the same values, since a pixel's calibrated score
    depends on those three only."""
    at = np.ix_(rows.first, cols.first)
    first_d = None if distance is None else distance[at]
    out = expand_runs(calibration.apply(scores[at], labels[at], first_d), rows, cols)
    edges = calibration.distance_edges
    same = (scores == expand_runs(scores[at], rows, cols)) & (labels == expand_runs(labels[at], rows, cols))
    if distance is not None:
        same &= distance_classes(distance, edges) == expand_runs(distance_classes(first_d, edges), rows, cols)
    other = ~same  # NaN (no-data) is never the same
    if other.any():
        out[other] = calibration.apply(scores[other], labels[other], None if distance is None else distance[other])
    return out


@dataclass(frozen=True)
class Rendering:
    """How a chunk's scores become outputs: threshold and overlay look."""

    threshold: float
    color: tuple[int, int, int]
    opacity: float
    n_neighbors: int
    #: Id of this rendering in the store's completion markers.
    id: str = ""


def subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` rows of ``x``, chosen with ``seed``, in their order."""
    if len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def pixel_sample(
    extractor: Extractor, dictionary: Dictionary, unit: Unit, n_neighbors: int, step: int,
    features: ChunkFeatures | None = None,
) -> np.ndarray:
    """Raw (uncalibrated) valid pixel scores of a unit on the image-wide lattice of every
    ``step``-th row and column, as rows ``(score, distance to no-data, nearest centroid)``
    (``features``: the unit's :meth:`Extractor.chunk_features`, when computed already)."""
    scores, _, distance, labels = extractor.pixel_scores(
        unit, dictionary, n_neighbors, calibrated=False, features=features
    )
    w = unit.window
    at = (slice((-w.y0) % step, None, step), slice((-w.x0) % step, None, step))  # image-wide lattice
    scores, labels = scores[at], labels[at]
    distance = np.full(scores.shape, np.inf, dtype=np.float32) if distance is None else distance[at]
    keep = np.isfinite(scores)
    return np.stack([scores[keep], distance[keep], labels[keep].astype(np.float32)], axis=1)


def redraw_chunk(
    unit: Unit, scores: np.ndarray, intensity: Intensity, rendering: Rendering
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """:func:`render_chunk` of stored scores: the raw pixels are read, the CNN does not run."""
    w = unit.window
    return render_chunk(scores, read_window(unit.source, w.y0, w.y1, w.x0, w.x1), intensity, rendering)


def render_chunk(
    scores: np.ndarray, raw: np.ndarray, intensity: Intensity, rendering: Rendering
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """A chunk's mask (uint8 0/255, never on no-data), overlay (RGB uint8) and statistics
    (``valid``, ``anomalous`` pixel counts and ``max`` score)."""
    finite = np.isfinite(scores)
    mask = np.where(finite & (scores >= rendering.threshold), 255, 0).astype(np.uint8)
    rgb = display_rgb(to_unit_rgb(raw, intensity))
    overlay = overlay_image(rgb, mask, rendering.color, rendering.opacity)
    stats = {
        "valid": int(finite.sum()),
        "anomalous": int((mask > 0).sum()),
        "max": float(scores[finite].max()) if finite.any() else float("nan"),
    }
    return mask, overlay, stats
