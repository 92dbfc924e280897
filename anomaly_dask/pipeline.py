"""Dask orchestration: the only module that schedules work and waits for it.

Work is cut into *units*: one chunk (a :class:`~anomaly_dask.grid.Window`) of one image.
Each task receives the small picklable image source, the chunk and a future of the model
(backbone + dictionary), which Dask moves to each worker once; it reads its window plus
halo, runs the backbone and returns only what the caller needs (a feature sample, projected
features or pixel scores of its chunk).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from .calibration import DISTANCE_EDGES
from .dictionary import Dictionary, coreset, fit_projection, init_kmeans
from .features import FeatureConfig, tile_features
from .grid import (
    TileGrid,
    Window,
    chunk_windows,
    lattice_floor,
    masked_box_mean,
    nearest_tiles,
    nodata_distance,
    pixel_scores_from_tiles,
    tile_fractions,
    tiles_covering,
)
from .outputs import display_rgb, overlay_image
from .sources import ImageSource, Intensity, read_window, to_unit_rgb, valid_pixels

__all__ = [
    "Extractor",
    "Rendering",
    "detect_chunks",
    "Unit",
    "local_client",
    "plan_units",
    "sample_pixel_scores",
    "score_array",
    "score_blocks",
    "train_dictionary",
]

log = logging.getLogger("anomaly_dask")

#: Pixels of no-data next to data filled with the data mirrored across the edge (see
#: :func:`~anomaly_dask.sources.mirror_fill`); windows are read this much wider, twice.
MIRROR_REACH = 32


@dataclass(frozen=True)
class Unit:
    """One chunk of one image."""

    source: ImageSource
    grid: TileGrid
    window: Window


def plan_units(source: ImageSource, grid: TileGrid, chunk: int) -> list[Unit]:
    """All chunks of an image, row-major."""
    return [Unit(source, grid, w) for row in chunk_windows(grid, chunk) for w in row]


@contextlib.contextmanager
def local_client(client: Any | None, threads: int | None = None) -> Iterator[Any]:
    """Yield ``client``, or a LocalCluster client started (and closed) for the block.

    Without a client an in-process cluster is used: one worker with ``threads`` task
    threads (default 1) sharing one copy of the model, torch using the remaining cores
    inside each task (measured faster on CPU than several single-threaded tasks). Pass
    ``client=`` to run on any other Dask cluster.
    """
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=threads or 1, processes=False, dashboard_address=":0"
    ) as cluster, Client(cluster) as own:
        yield own


def _set_torch_threads() -> None:
    import torch

    try:
        from distributed import get_worker

        worker = get_worker()
        nthreads = worker.state.nthreads
        budget = getattr(worker, "anomaly_dask_torch_threads", None)  # set by cluster.TorchThreads
    except (ImportError, ValueError):
        nthreads, budget = 1, None
    want = budget or max(1, (os.cpu_count() or 1) // max(1, nthreads))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def _axis_window(
    lo: int, hi: int, stride: int, tile: int, halo: int, lattice: int
) -> tuple[int, int, int]:
    """Pixel span read for tiles ``[lo, hi)`` on one axis: (start, stop, first tile offset)."""
    start = lattice_floor(lo * stride - halo, lattice)
    stop = (hi - 1) * stride + tile + halo
    stop = start + -(-(stop - start) // lattice) * lattice
    return start, stop, lo * stride - start


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
    """

    backbone: Any
    config: FeatureConfig
    intensity: Intensity
    nodata: float | None = None
    min_valid: float = 0.5
    mirror: int = MIRROR_REACH

    def _read(
        self, unit: Unit, rows: tuple[int, int], cols: tuple[int, int]
    ) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int]]:
        """Raw window for tiles ``rows x cols`` plus ``2 * mirror`` px on every side."""
        g = unit.grid
        lattice, halo = self.config.lattice(self.backbone), self.config.halo(self.backbone)
        y0, y1, oy = _axis_window(*rows, g.stride_h, g.tile_h, halo, lattice)
        x0, x1, ox = _axis_window(*cols, g.stride_w, g.tile_w, halo, lattice)
        m = 2 * self.mirror
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
            The raw window read: the tiles plus the backbone's halo, plus ``2 * mirror``
            pixels for the no-data fill.
        origin : (int, int)
            Image position of ``raw[0, 0]``.
        """
        _set_torch_threads()
        wide, (y0, y1, x0, x1), offset = self._read(unit, rows, cols)
        n = (rows[1] - rows[0], cols[1] - cols[0])
        m = 2 * self.mirror
        crop = (slice(m, m + y1 - y0), slice(m, m + x1 - x0))
        raw = wide[crop]
        wide_valid = valid_pixels(wide, self.nodata if self.nodata is not None else unit.source.nodata)
        fraction = None
        if wide_valid is None:
            pixels = to_unit_rgb(raw, self.intensity)
        else:
            # fill on the wider window, so that what a pixel gets does not depend on the chunk
            pixels = to_unit_rgb(wide, self.intensity, wide_valid, self.mirror)[crop]
            valid = wide_valid[crop]
            fraction = tile_fractions(valid, offset, n, unit.grid)
        feats = tile_features(self.backbone, self.config, pixels, offset, n, unit.grid)
        return feats, fraction, wide, (y0 - m, x0 - m)

    def owned(self, unit: Unit) -> np.ndarray:
        """Features (n, D) of the tiles a unit owns, less those mostly in no-data."""
        f, fraction, _, _ = self.features(unit, unit.window.own_rows, unit.window.own_cols)
        f = f.reshape(-1, f.shape[-1])
        if fraction is None:
            return f
        return f[fraction.ravel() >= self.min_valid]

    def pixel_scores(
        self, unit: Unit, dictionary: Dictionary, n_neighbors: int, calibrated: bool = True
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
        no-data.

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
        ext = (max(0, w.y0 - reach), min(g.height, w.y1 + reach), max(0, w.x0 - reach), min(g.width, w.x1 + reach))
        rows, cols = tiles_covering(g, ext)
        f, fraction, raw, (oy, ox) = self.features(unit, rows, cols)
        chunk_raw = raw[w.y0 - oy : w.y1 - oy, w.x0 - ox : w.x1 - ox]
        tiles, tile_labels = dictionary.score_and_label(f, n_neighbors)
        iy = nearest_tiles(w.y0, w.y1, g.stride_h, g.tile_h, g.n_rows) - rows[0]
        ix = nearest_tiles(w.x0, w.x1, g.stride_w, g.tile_w, g.n_cols) - cols[0]
        labels = tile_labels[np.ix_(iy, ix)]
        calibration = dictionary.calibration if calibrated else None
        if fraction is None:
            scores = pixel_scores_from_tiles(tiles, g, (rows[0], cols[0]), (w.y0, w.y1, w.x0, w.x1))
            if calibration is not None:
                scores = calibration.apply(scores, labels, None)
            return scores, chunk_raw, None, labels
        full = fraction >= 1.0
        origin = (rows[0], cols[0])
        on_data = pixel_scores_from_tiles(tiles, g, origin, ext, full.astype(np.float64))
        covered = pixel_scores_from_tiles(full.astype(np.float32), g, origin, ext) > 0
        near, count = masked_box_mean(on_data, covered, reach)
        partial = (fraction >= self.min_valid).astype(np.float64)
        inner = (w.y0 - ext[0], w.y0 - ext[0] + w.shape[0], w.x0 - ext[2], w.x0 - ext[2] + w.shape[1])
        crop = (slice(inner[0], inner[1]), slice(inner[2], inner[3]))
        scores = np.where(
            covered[crop],
            on_data[crop],
            np.where(
                count[crop] > 0,
                near[crop],
                pixel_scores_from_tiles(tiles, g, origin, (w.y0, w.y1, w.x0, w.x1), partial),
            ),
        ).astype(np.float32)
        wide_valid = valid_pixels(raw, self.nodata if self.nodata is not None else unit.source.nodata)
        edges = self.distance_edges(g) if dictionary.calibration is None else dictionary.calibration.distance_edges
        box = (w.y0 - oy, w.y1 - oy, w.x0 - ox, w.x1 - ox)
        distance = nodata_distance(wide_valid, box, float(edges[0])) if len(edges) else None
        if calibration is not None:
            scores = calibration.apply(scores, labels, distance)
        scores[~wide_valid[box[0] : box[1], box[2] : box[3]]] = np.nan
        return scores, chunk_raw, distance, labels


def _subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def _sample_task(extractor: Extractor, unit: Unit, n: int, seed: int) -> np.ndarray:
    return _subsample(extractor.owned(unit), n, seed)


def _project_task(extractor: Extractor, dictionary: Dictionary, unit: Unit, seed: int) -> np.ndarray:
    z = dictionary.transform(extractor.owned(unit))
    return z[np.random.default_rng(seed).permutation(len(z))]


def _pixel_sample_task(
    extractor: Extractor, dictionary: Dictionary, unit: Unit, n_neighbors: int, step: int
) -> np.ndarray:
    scores, _, distance, labels = extractor.pixel_scores(unit, dictionary, n_neighbors, calibrated=False)
    w = unit.window
    at = (slice((-w.y0) % step, None, step), slice((-w.x0) % step, None, step))  # image-wide lattice
    scores, labels = scores[at], labels[at]
    distance = np.full(scores.shape, np.inf, dtype=np.float32) if distance is None else distance[at]
    keep = np.isfinite(scores)
    return np.stack([scores[keep], distance[keep], labels[keep].astype(np.float32)], axis=1)


def _pixel_score_task(
    extractor: Extractor, dictionary: Dictionary, unit: Unit, n_neighbors: int
) -> np.ndarray:
    return extractor.pixel_scores(unit, dictionary, n_neighbors)[0]


@dataclass(frozen=True)
class Rendering:
    """How a chunk's scores become outputs: threshold and overlay look."""

    threshold: float
    color: tuple[int, int, int]
    opacity: float
    n_neighbors: int


def _detect_task(
    extractor: Extractor, dictionary: Dictionary, unit: Unit, store: Any, index: tuple[int, int],
    rendering: Rendering,
) -> dict[str, float]:
    """Score one chunk, write score / mask / overlay to the store, return its statistics."""
    scores, raw, _, _ = extractor.pixel_scores(unit, dictionary, rendering.n_neighbors)
    finite = np.isfinite(scores)
    mask = np.where(finite & (scores >= rendering.threshold), 255, 0).astype(np.uint8)
    rgb = display_rgb(to_unit_rgb(raw, extractor.intensity))
    overlay = overlay_image(rgb, mask, rendering.color, rendering.opacity)
    store.write_chunk(index[0], index[1], scores, mask, overlay)
    return {
        "valid": int(finite.sum()),
        "anomalous": int((mask > 0).sum()),
        "max": float(scores[finite].max()) if finite.any() else float("nan"),
    }


def detect_chunks(
    client: Any,
    extractor: Any,
    dictionary: Any,
    jobs: list[tuple[Unit, tuple[int, int]]],
    store: Any,
    rendering: Rendering,
    progress: Any = None,
) -> list[dict[str, float]]:
    """Run :func:`_detect_task` for each (unit, chunk index), at most two per thread in flight.

    ``progress(done, total)`` is called after each chunk.
    """
    out = []
    args = [(extractor, dictionary, u, store, idx, rendering) for u, idx in jobs]
    for k, stats in enumerate(_stream(client, _detect_task, args, _in_flight(client)), 1):
        out.append(stats)
        if progress is not None:
            progress(k, len(jobs))
    return out


def _stream(client: Any, fn: Any, jobs: Iterable[tuple], limit: int, ordered: bool = False) -> Iterator[Any]:
    """Run ``fn(*args)`` for each job with at most ``limit`` in flight; yield results.

    Results come as they complete, or in job order with ``ordered=True`` (then finished
    results waiting for an earlier one count against ``limit``), which makes what is
    computed from them independent of the cluster's size and timing.
    """
    from distributed import as_completed

    jobs = iter(enumerate(jobs))
    pending = as_completed()
    index: dict[str, int] = {}
    waiting: dict[int, Any] = {}
    following = 0

    def submit() -> bool:
        for k, args in jobs:
            fut = client.submit(fn, *args, pure=False)
            index[fut.key] = k
            pending.add(fut)
            return True
        return False

    while pending.count() + len(waiting) < limit and submit():
        pass
    for fut in pending:
        result = fut.result()
        k = index.pop(fut.key)
        fut.release()
        if not ordered:
            yield result
        else:
            waiting[k] = result
            while following in waiting:
                yield waiting.pop(following)
                following += 1
        while pending.count() + len(waiting) < limit and submit():
            pass


def _in_flight(client: Any) -> int:
    return 2 * max(1, sum(client.nthreads().values()))


def train_dictionary(
    client: Any,
    extractor: Any,
    units: list[Unit],
    *,
    pca_variance: float,
    n_clusters: int,
    n_init: int,
    max_fit_tiles: int,
    random_state: int,
    memory_size: int = 0,
    batch_size: int = 4096,
) -> Dictionary:
    """Fit PCA, scaler and MiniBatchKMeans on the tiles of ``units``, streaming chunk results.

    Memory is bounded by ``max_fit_tiles`` feature rows whatever the number of units: PCA is
    fitted on a random sample of at most that many tiles; k-means is seeded on the projected
    sample and refined by ``partial_fit`` on every chunk's projected tiles, in shuffled
    order. When the sample already holds every training tile the second pass reuses it.

    Parameters
    ----------
    client : distributed.Client
    extractor : Future of Extractor
    units : list of Unit
        Training chunks.
    pca_variance, n_clusters, n_init : float, int, int
        Fraction of variance kept; k-means clusters and restarts of the seeding k-means.
    max_fit_tiles : int
        Largest number of tile features held at once.
    memory_size : int
        Tiles of the coreset memory chosen from the projected sample (0: none; see
        :func:`~anomaly_dask.dictionary.coreset`).
    random_state : int
        Seed of sampling, PCA and k-means.
    batch_size : int
        Rows per ``partial_fit`` call.
    """
    rng = np.random.default_rng(random_state)
    order = [units[i] for i in rng.permutation(len(units))]
    total = sum(
        (u.window.own_rows[1] - u.window.own_rows[0]) * (u.window.own_cols[1] - u.window.own_cols[0])
        for u in order
    )
    complete = total <= max_fit_tiles
    sample_units = order if complete else order[: min(len(order), 256)]
    per_unit = max_fit_tiles if complete else max(1, max_fit_tiles // len(sample_units))
    seeds = rng.integers(0, 2**31, size=(len(order), 2))
    jobs = [(extractor, u, per_unit, int(seeds[i, 0])) for i, u in enumerate(sample_units)]
    sample_parts = list(_stream(client, _sample_task, jobs, _in_flight(client), ordered=True))
    sample = np.concatenate(sample_parts)
    log.info("fitting PCA on %d tile features of dimension %d", *sample.shape)
    dictionary = fit_projection(sample, pca_variance, random_state)
    projected = dictionary.transform(sample)
    log.info("PCA keeps %d components; seeding k-means (k=%d)", projected.shape[1], n_clusters)
    mbk = init_kmeans(projected, n_clusters, n_init, random_state, batch_size)
    if memory_size:
        dictionary.memory = coreset(projected, memory_size, random_state)
        log.info("coreset memory of %d of %d sampled tiles", len(dictionary.memory), len(projected))
    del sample, projected
    if complete:
        parts: Iterable[np.ndarray] = (dictionary.transform(p) for p in sample_parts)
    else:
        sample_parts.clear()
        dict_future = client.scatter(dictionary, broadcast=True)
        jobs2 = [(extractor, dict_future, u, int(seeds[i, 1])) for i, u in enumerate(order)]
        parts = _stream(client, _project_task, jobs2, _in_flight(client), ordered=True)
    for z in parts:
        for k in range(0, len(z), batch_size):
            batch = z[k : k + batch_size]
            if len(batch) >= mbk.n_clusters:
                mbk.partial_fit(batch)
    dictionary.centroids = mbk.cluster_centers_.astype(np.float32)
    return dictionary


def sample_pixel_scores(
    client: Any, extractor: Any, dictionary: Any, units: list[Unit], n_neighbors: int, step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The units' valid raw pixel scores on a lattice of every ``step``-th row and column.

    Returns
    -------
    scores : ndarray of float32
    distance : ndarray of float32
        Each pixel's distance to no-data, capped (see :meth:`Extractor.pixel_scores`); inf
        where its chunk has none within the cap.
    labels : ndarray of int
        Each pixel's nearest centroid (see :meth:`Extractor.pixel_scores`).
    """
    jobs = [(extractor, dictionary, u, n_neighbors, step) for u in units]
    both = np.concatenate(list(_stream(client, _pixel_sample_task, jobs, _in_flight(client), ordered=True)))
    return both[:, 0], both[:, 1], both[:, 2].astype(np.int64)


def score_blocks(
    client: Any, extractor: Any, dictionary: Any, units: list[Unit], n_neighbors: int
) -> Iterator[tuple[Unit, np.ndarray]]:
    """Pixel scores of each unit, yielded in unit order with a bounded number in flight
    (so a whole mosaic is never held at once)."""
    jobs = [(extractor, dictionary, u, n_neighbors) for u in units]
    yield from zip(units, _stream(client, _pixel_score_task, jobs, _in_flight(client), ordered=True))


def score_array(
    extractor: Any, dictionary: Any, source: ImageSource, grid: TileGrid, chunk: int, n_neighbors: int
) -> da.Array:
    """Lazy pixel scores of one image: a dask array chunked like the processing.

    Parameters
    ----------
    extractor, dictionary : Future or object
        The model's parts, ideally futures scattered once per job.
    source : ImageSource
        The image.
    grid : TileGrid
        Its tile grid.
    chunk : int
        Chunk size in pixels.
    n_neighbors : int
        Centroids averaged per tile score.
    """
    rows = []
    for row in chunk_windows(grid, chunk):
        blocks = []
        for w in row:
            task = dask.delayed(_pixel_score_task, pure=True)(
                extractor, dictionary, Unit(source, grid, w), n_neighbors
            )
            blocks.append(da.from_delayed(task, shape=w.shape, dtype=np.float32))
        rows.append(blocks)
    return da.block(rows)
