"""Tile grid and chunk geometry: pure integer and array maths, no IO.

The tile grid is the seed's: tiles of ``tile_h x tile_w`` pixels whose top-left corners lie
at multiples of the stride, ``(i * stride_h, j * stride_w)``, as many as fit in the image.
A pixel's score is the mean score of the tiles covering it; the few pixels past the last
tile (when the image size minus the tile is not a multiple of the stride) take the scores of
the nearest tiles.

Chunks partition the image into ``chunk x chunk`` squares from the top-left corner. A
chunk *owns* the tiles whose top-left corner it contains (used to train: every tile once)
and is *covered* by the tiles that overlap any of its pixels (used to score its pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np

__all__ = [
    "Runs",
    "TileGrid",
    "Window",
    "axis_chunks",
    "chunk_windows",
    "expand_runs",
    "masked_box_mean",
    "nearest_tiles",
    "nodata_distance",
    "owns_tiles",
    "pixel_runs",
    "pixel_scores_from_tiles",
    "tile_fractions",
    "tile_means",
    "tiles_covering",
]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one image.

    Parameters
    ----------
    height, width : int
        Image size in pixels; at least one tile must fit.
    tile_h, tile_w : int
        Tile size in pixels.
    stride_h, stride_w : int
        Distance between neighbouring tiles' top-left corners.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    stride_h: int
    stride_w: int

    @property
    def n_rows(self) -> int:
        """Number of tile rows."""
        return (self.height - self.tile_h) // self.stride_h + 1

    @property
    def n_cols(self) -> int:
        """Number of tile columns."""
        return (self.width - self.tile_w) // self.stride_w + 1

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the image."""
        return self.n_rows * self.n_cols


@dataclass(frozen=True)
class Window:
    """One chunk of an image and the tiles it needs.

    Attributes
    ----------
    y0, y1, x0, x1 : int
        The chunk's pixels, ``[y0, y1) x [x0, x1)``.
    own_rows, own_cols : tuple of int
        Half-open ranges of tile indices whose top-left corner lies in the chunk.
    cover_rows, cover_cols : tuple of int
        Half-open ranges of tile indices needed to score every pixel of the chunk.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    own_rows: tuple[int, int]
    own_cols: tuple[int, int]
    cover_rows: tuple[int, int]
    cover_cols: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """Chunk shape in pixels."""
        return (self.y1 - self.y0, self.x1 - self.x0)


def axis_chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    """Split one image axis into chunks of ``chunk`` pixels.

    Parameters
    ----------
    length : int
        Image size along the axis.
    chunk : int
        Chunk size in pixels.

    Returns
    -------
    list of (start, stop)
        Contiguous chunks covering ``[0, length)`` starting at multiples of ``chunk``; the
        last one holds the remainder. These are the chunks of an output store.
    """
    return [(a, min(a + chunk, length)) for a in range(0, length, chunk)]


def _own_range(p0: int, p1: int, stride: int, n: int) -> tuple[int, int]:
    """Tiles whose top-left corner lies in ``[p0, p1)`` (empty past the last tile)."""
    lo, hi = min(n, -(-p0 // stride)), min(n, -(-p1 // stride))
    return (lo, hi)


def _cover_range(p0: int, p1: int, tile: int, stride: int, n: int) -> tuple[int, int]:
    lo = max(0, -((tile - 1 - p0) // stride))  # ceil((p0 - tile + 1) / stride)
    hi = min(n - 1, (p1 - 1) // stride)
    return (min(lo, hi), hi + 1)


def tiles_covering(
    grid: TileGrid, pixels: tuple[int, int, int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Half-open tile row and column ranges covering a pixel rectangle ``(y0, y1, x0, x1)``
    (with the nearest tiles for pixels past the last one)."""
    y0, y1, x0, x1 = pixels
    return (
        _cover_range(y0, y1, grid.tile_h, grid.stride_h, grid.n_rows),
        _cover_range(x0, x1, grid.tile_w, grid.stride_w, grid.n_cols),
    )


def chunk_windows(grid: TileGrid, chunk: int) -> list[list[Window]]:
    """Cut ``grid``'s image into chunks of ``chunk`` pixels a side: the one chunking of
    training, scoring and output stores.

    Parameters
    ----------
    grid : TileGrid
        The image's tile grid.
    chunk : int
        Chunk size in pixels (any: a chunk's tiles are found from its pixel range).

    Returns
    -------
    list of list of Window
        Row-major chunks; the last row and column hold the remainder. Every tile is owned by
        exactly one chunk; a chunk past the last tile's corner owns none (it is still
        scored, by the tiles covering it).
    """
    ys = axis_chunks(grid.height, chunk)
    xs = axis_chunks(grid.width, chunk)
    return [
        [
            Window(
                y0, y1, x0, x1,
                own_rows=_own_range(y0, y1, grid.stride_h, grid.n_rows),
                own_cols=_own_range(x0, x1, grid.stride_w, grid.n_cols),
                cover_rows=_cover_range(y0, y1, grid.tile_h, grid.stride_h, grid.n_rows),
                cover_cols=_cover_range(x0, x1, grid.tile_w, grid.stride_w, grid.n_cols),
            )
            for x0, x1 in xs
        ]
        for y0, y1 in ys
    ]


def owns_tiles(window: Window) -> bool:
    """Whether any tile's top-left corner lies in ``window``."""
    return window.own_rows[1] > window.own_rows[0] and window.own_cols[1] > window.own_cols[0]


def _axis_tile_span(p: np.ndarray, tile: int, stride: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last tile index covering each pixel position ``p`` (nearest if none)."""
    hi = np.minimum(n - 1, p // stride)
    lo = np.maximum(0, -((tile - 1 - p) // stride))
    return np.minimum(lo, hi), hi


def _prefix2(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    out[1:, 1:] = np.cumsum(np.cumsum(a, axis=0, dtype=np.float64), axis=1)
    return out


def tile_fractions(
    valid: np.ndarray,
    tile_offset: tuple[int, int],
    n_tiles: tuple[int, int],
    grid: TileGrid,
    margin: int = 0,
) -> np.ndarray:
    """Fraction of valid pixels in each tile of a window, or in each tile grown by a margin.

    Parameters
    ----------
    valid : ndarray of bool, shape (h, w)
        Valid (not no-data) pixels of the window.
    tile_offset : (int, int)
        Position in the window of the first tile's top-left corner.
    n_tiles : (int, int)
        Tile rows and columns.
    grid : TileGrid
        Tile size and stride.
    margin : int
        Pixels added on every side of each tile (the window must hold them).

    Returns
    -------
    ndarray of float32, shape n_tiles
    """
    if min(tile_offset) < margin:
        raise ValueError("the window does not hold the margin around the first tile")
    p = _prefix2(valid)
    ys = tile_offset[0] - margin + grid.stride_h * np.arange(n_tiles[0])
    xs = tile_offset[1] - margin + grid.stride_w * np.arange(n_tiles[1])
    ye, xe = ys + grid.tile_h + 2 * margin, xs + grid.tile_w + 2 * margin
    if ye[-1] > valid.shape[0] or xe[-1] > valid.shape[1]:
        raise ValueError("the window does not hold the margin around the last tile")
    total = p[np.ix_(ye, xe)] - p[np.ix_(ys, xe)] - p[np.ix_(ye, xs)] + p[np.ix_(ys, xs)]
    area = (grid.tile_h + 2 * margin) * (grid.tile_w + 2 * margin)
    return (total / area).astype(np.float32)


@dataclass(frozen=True)
class Runs:
    """Runs of consecutive pixels along one axis that share what a computation reads.

    Attributes
    ----------
    first : ndarray of int
        Offset (from the axis' first pixel) of each run's first pixel.
    lengths : ndarray of int
        Pixels in each run.
    """

    first: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, *keys: np.ndarray) -> Runs:
        """Runs over which every key (one value per pixel, equal lengths) is constant."""
        n = len(keys[0])
        change = np.zeros(n, dtype=bool)
        change[:1] = True
        for k in keys:
            change[1:] |= k[1:] != k[:-1]
        first = np.flatnonzero(change)
        return cls(first, np.diff(np.append(first, n)))


def pixel_runs(lo: int, hi: int, stride: int, tile: int, n_tiles: int) -> Runs:
    """Runs of pixels ``lo .. hi - 1`` along one axis covered by the same tiles and with the
    same :func:`nearest_tiles` tile: every per-pixel value computed from tile values (a mean
    of covering tiles, the nearest tile's label) is constant over a run, so it can be
    computed once per run and spread with :func:`expand_runs` (a stride-8 grid of 32 px
    tiles has runs of 4 px: 16x fewer values to compute)."""
    p = np.arange(lo, hi)
    a, b = _axis_tile_span(p, tile, stride, n_tiles)
    return Runs.of(a, b, nearest_tiles(lo, hi, stride, tile, n_tiles))


def expand_runs(values: np.ndarray, rows: Runs, cols: Runs) -> np.ndarray:
    """Values (one per row run x column run) spread onto the pixels of the runs."""
    return np.repeat(np.repeat(values, rows.lengths, axis=0), cols.lengths, axis=1)


def tile_means(
    tile_scores: np.ndarray,
    grid: TileGrid,
    tile_origin: tuple[int, int],
    ys: np.ndarray,
    xs: np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Average tile scores onto the pixels ``ys x xs`` (image rows and columns).

    Parameters
    ----------
    tile_scores : ndarray, shape (r, c)
        Scores of tiles ``tile_origin[0] + [0, r)`` by ``tile_origin[1] + [0, c)``; must
        include every tile covering the pixels.
    grid : TileGrid
        The image's tile grid.
    tile_origin : (int, int)
        Global index of ``tile_scores[0, 0]``.
    ys, xs : ndarray of int
        Image rows and columns of the pixels (their outer product is scored).
    weights : ndarray, shape (r, c), optional
        Tile weights (e.g. 0 for tiles mostly in no-data); a pixel whose covering tiles all
        weigh 0 takes their plain mean.

    Returns
    -------
    ndarray of float32, shape (len(ys), len(xs))
        (Weighted) mean score of the tiles covering each pixel.
    """
    a, b = _axis_tile_span(np.asarray(ys), grid.tile_h, grid.stride_h, grid.n_rows)
    c, d = _axis_tile_span(np.asarray(xs), grid.tile_w, grid.stride_w, grid.n_cols)
    a, b = a - tile_origin[0], b - tile_origin[0]
    c, d = c - tile_origin[1], d - tile_origin[1]
    r, k = tile_scores.shape
    if a.min() < 0 or b.max() >= r or c.min() < 0 or d.max() >= k:
        raise ValueError("tile_scores does not cover the requested pixels")

    def box(values: np.ndarray) -> np.ndarray:
        p = _prefix2(values)
        return p[np.ix_(b + 1, d + 1)] - p[np.ix_(a, d + 1)] - p[np.ix_(b + 1, c)] + p[np.ix_(a, c)]

    plain = box(tile_scores) / np.outer(b - a + 1, d - c + 1)
    if weights is None:
        return plain.astype(np.float32)
    wsum = box(weights)
    weighted = box(tile_scores * weights) / np.where(wsum > 0, wsum, 1.0)
    return np.where(wsum > 1e-9, weighted, plain).astype(np.float32)


def pixel_scores_from_tiles(
    tile_scores: np.ndarray,
    grid: TileGrid,
    tile_origin: tuple[int, int],
    pixels: tuple[int, int, int, int],
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`tile_means` of the pixel rectangle ``pixels = (y0, y1, x0, x1)``, computed
    once per :func:`pixel_runs` run and spread over the rectangle.

    Returns
    -------
    ndarray of float32, shape (y1 - y0, x1 - x0)
    """
    y0, y1, x0, x1 = pixels
    rows = pixel_runs(y0, y1, grid.stride_h, grid.tile_h, grid.n_rows)
    cols = pixel_runs(x0, x1, grid.stride_w, grid.tile_w, grid.n_cols)
    values = tile_means(tile_scores, grid, tile_origin, y0 + rows.first, x0 + cols.first, weights)
    return expand_runs(values, rows, cols)


def nearest_tiles(lo: int, hi: int, stride: int, tile: int, n_tiles: int) -> np.ndarray:
    """Index of the tile centred nearest each pixel ``lo .. hi - 1`` along one axis.

    Tile ``i`` spans ``[i stride, i stride + tile)``. The chosen tile covers the pixel;
    pixels past the last tile's span take the last tile.
    """
    idx = (np.arange(lo, hi) - (tile - stride) // 2) // stride
    return np.clip(idx, 0, n_tiles - 1)


def nodata_distance(valid: np.ndarray, box: tuple[int, int, int, int], cap: float) -> np.ndarray | None:
    """Euclidean distance of each pixel of a box to the nearest no-data pixel, capped.

    Parameters
    ----------
    valid : ndarray of bool, shape (h, w)
        Valid pixels of a window that holds the box plus ``ceil(cap)`` pixels on every side
        (then distances below ``cap`` are exact whatever lies outside the window).
    box : (y0, y1, x0, x1)
        The pixels wanted, in window coordinates.
    cap : float
        Largest distance reported; farther pixels get ``cap``.

    Returns
    -------
    ndarray of float32 with the box's shape, or None when no no-data lies within ``cap``.
    """
    from scipy.ndimage import distance_transform_edt

    y0, y1, x0, x1 = box
    r = int(np.ceil(cap))
    if y0 < r or x0 < r or y1 + r > valid.shape[0] or x1 + r > valid.shape[1]:
        raise ValueError("the window does not hold the box plus the cap")
    region = valid[y0 - r : y1 + r, x0 - r : x1 + r]
    if region.all():
        return None
    d = distance_transform_edt(region)[r : r + y1 - y0, r : r + x1 - x0]
    return np.minimum(d, cap).astype(np.float32)


def masked_box_mean(
    values: np.ndarray, mask: np.ndarray, radius: int, at: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` where ``mask`` holds, over the square of ``radius`` around each
    pixel (clipped to the array).

    Parameters
    ----------
    values : ndarray (h, w)
    mask : ndarray of bool (h, w)
        Pixels that count.
    radius : int
        Half side of the square, in pixels.
    at : (ndarray of int, ndarray of int), optional
        Rows and columns of the only pixels wanted (e.g. from ``np.nonzero``); the sums
        are then read off the summed-area tables at those pixels alone.

    Returns
    -------
    mean : ndarray of float32, (h, w) or one value per pixel of ``at``
        NaN where no pixel of the square counts.
    count : ndarray of int, same shape
        Pixels counted.
    """
    h, w = values.shape
    ys, xs = (np.arange(h), np.arange(w)) if at is None else at
    y_lo, y_hi = np.maximum(ys - radius, 0), np.minimum(ys + radius + 1, h)
    x_lo, x_hi = np.maximum(xs - radius, 0), np.minimum(xs + radius + 1, w)

    def box(a: np.ndarray) -> np.ndarray:
        p = _prefix2(a)
        if at is not None:
            return p[y_hi, x_hi] - p[y_lo, x_hi] - p[y_hi, x_lo] + p[y_lo, x_lo]
        return p[np.ix_(y_hi, x_hi)] - p[np.ix_(y_lo, x_hi)] - p[np.ix_(y_hi, x_lo)] + p[np.ix_(y_lo, x_lo)]

    count = np.rint(box(mask)).astype(np.int64)
    total = box(np.where(mask, values, 0.0))
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean.astype(np.float32), count


def lattice_floor(value: int, step: int) -> int:
    """Largest multiple of ``step`` not above ``value``."""
    return (value // step) * step


def common_cell(*sizes: int) -> int:
    """Greatest common divisor of several positive sizes."""
    out = 0
    for s in sizes:
        out = gcd(out, int(s))
    return out
