"""Tasks and their streams: training passes, calibration samples, scoring, detect runs.

Part of :mod:`anomaly_dask.compute`. Each task gets the small picklable image source, its
chunk and futures of the model, sent to every worker once; at most two tasks per worker
thread are in flight, and results are consumed as they come (or in order), so a mosaic is
never held whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import dask.array as da
import numpy as np

from ..dictionary import Dictionary, coreset, fit_projection, init_kmeans
from ..grid import TileGrid, chunk_windows
from ..io import ImageSource
from ..scoring import (
    ChunkFeatures,
    Extractor,
    Rendering,
    Unit,
    pixel_sample,
    redraw_chunk,
    render_chunk,
    subsample,
)
from .cluster import local_client, set_torch_threads

__all__ = [
    "Session",
    "detect_chunks",
    "redraw_chunks",
    "fit_model",
    "sample_pixel_scores",
    "scatter",
    "score_array",
    "score_blocks",
    "session",
    "train_dictionary",
]

log = logging.getLogger("anomaly_dask")

#: ``progress(step, done, total)``: called with ``done = 0`` when a pass starts and after
#: each of its ``total`` chunks (see :func:`fit_model` for the steps).
Progress = Callable[[str, int, int], None]


def _counted(items: Iterable[Any], progress: Progress | None, step: str, total: int) -> Iterator[Any]:
    """``items``, reporting ``step`` to ``progress`` at the start and after each item."""
    if progress is not None:
        progress(step, 0, total)
    for k, item in enumerate(items, 1):
        yield item
        if progress is not None:
            progress(step, k, total)


def scatter(client: Any, *parts: Any) -> tuple[Any, ...]:
    """Send each of ``parts`` (extractor, dictionary) to every worker once; their futures."""
    return tuple(client.scatter(p, broadcast=True) for p in parts)


class Session:
    """A client with a fitted model on its workers (sent once), for one estimator call.

    Parameters
    ----------
    client : distributed.Client
    extractor : Extractor
    dictionary : Dictionary
    """

    def __init__(self, client: Any, extractor: Extractor, dictionary: Dictionary) -> None:
        self.client = client
        self.extractor, self.dictionary = scatter(client, extractor, dictionary)

    def score(self, source: ImageSource, grid: TileGrid, chunk: int, n_neighbors: int) -> np.ndarray:
        """Pixel scores of one (ordinary-sized) image, whole."""
        array = score_array(self.extractor, self.dictionary, source, grid, chunk, n_neighbors)
        return self.client.compute(array).result()

    def blocks(self, units: list[Unit], n_neighbors: int) -> Iterator[tuple[Unit, np.ndarray]]:
        """Pixel scores of each unit in order, streamed (see :func:`score_blocks`)."""
        return score_blocks(self.client, self.extractor, self.dictionary, units, n_neighbors)

    def detect(
        self, jobs: list[tuple[Unit, tuple[int, int]]], store: Any, rendering: Rendering, progress: Any = None
    ) -> list[dict[str, float]]:
        """Score and write chunks into ``store`` (see :func:`detect_chunks`)."""
        return detect_chunks(self.client, self.extractor, self.dictionary, jobs, store, rendering, progress)

    def redraw(
        self, intensity: Any, jobs: list[tuple[Unit, tuple[int, int]]], store: Any, rendering: Rendering,
        progress: Any = None,
    ) -> list[dict[str, float]]:
        """Redraw masks and overlays of stored scores (see :func:`redraw_chunks`)."""
        return redraw_chunks(self.client, intensity, jobs, store, rendering, progress)


@contextlib.contextmanager
def session(client: Any | None, extractor: Extractor, dictionary: Dictionary) -> Iterator[Session]:
    """A :class:`Session` on ``client`` (or on the client :func:`local_client` picks)."""
    with local_client(client) as c:
        yield Session(c, extractor, dictionary)


def fit_model(
    client: Any | None,
    extractor: Extractor,
    train_units: list[Unit],
    val_units: list[Unit],
    *,
    calibration_step: int,
    n_neighbors: int,
    progress: Progress | None = None,
    **fit: Any,
) -> tuple[Dictionary, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fit the dictionary on ``train_units`` and sample raw pixel scores of ``val_units``
    for its calibration, in one flow on one cluster.

    The backbone runs once over the training chunks and once over the validation chunks.
    The extractor is sent to the workers once, and the dictionary once, complete, for the
    calibration sample. Nothing sent is changed afterwards. While this process fits the
    dictionary, the workers compute the backbone features of the first validation chunks
    (as many as are kept in flight, submitted after the last training chunk and at a lower
    priority), which do not depend on it; the calibration pass then scores them without running the
    backbone again.

    Parameters
    ----------
    client : distributed.Client, optional
    extractor : Extractor
    train_units, val_units : list of Unit
    calibration_step : int
        Pixels are sampled on the lattice of every ``calibration_step``-th row and column.
    n_neighbors : int
        Centroids averaged per tile score.
    progress : callable, optional
        ``progress(step, done, total)`` for each pass, in order: ``"sample"`` (tile features
        sampled from training chunks), ``"fit"`` (k-means refined chunk by chunk) and
        ``"calibrate"`` (raw pixel scores of validation chunks); ``done`` runs from 0 to
        ``total`` chunks.
    **fit
        Keyword arguments of :func:`train_dictionary`.

    Returns
    -------
    dictionary : Dictionary
        Without calibration.
    sample : (scores, distance, labels)
        See :func:`sample_pixel_scores`.
    """
    with local_client(client) as c:
        (ex,) = scatter(c, extractor)
        ahead: list[Any] = []

        def prefetch() -> None:
            ahead.extend(
                c.submit(_chunk_features_task, ex, u, pure=False, priority=-1)
                for u in val_units[: _in_flight(c)]
            )

        dictionary = train_dictionary(c, ex, train_units, progress=progress, submitted=prefetch, **fit)
        (d,) = scatter(c, dictionary)
        sample = sample_pixel_scores(c, ex, d, val_units, n_neighbors, calibration_step, progress, ahead)
    return dictionary, sample


def _sample_task(extractor: Extractor, unit: Unit, n: int, seed: int) -> np.ndarray:
    set_torch_threads()
    return subsample(extractor.owned(unit), n, seed)


def _chunk_features_task(extractor: Extractor, unit: Unit) -> ChunkFeatures:
    set_torch_threads()
    return extractor.chunk_features(unit)


def _pixel_sample_task(
    extractor: Extractor, dictionary: Dictionary, unit: Unit, n_neighbors: int, step: int,
    features: ChunkFeatures | None = None,
) -> np.ndarray:
    set_torch_threads()
    return pixel_sample(extractor, dictionary, unit, n_neighbors, step, features)


def _pixel_score_task(
    extractor: Extractor, dictionary: Dictionary, unit: Unit, n_neighbors: int
) -> np.ndarray:
    set_torch_threads()
    return extractor.pixel_scores(unit, dictionary, n_neighbors)[0]


def _detect_task(
    extractor: Extractor, dictionary: Dictionary, unit: Unit, store: Any, index: tuple[int, int],
    rendering: Rendering,
) -> dict[str, float]:
    """Score one chunk, write score / mask / overlay to the store, return its statistics."""
    set_torch_threads()
    scores, raw, _, _ = extractor.pixel_scores(unit, dictionary, rendering.n_neighbors)
    mask, overlay, stats = render_chunk(scores, raw, extractor.intensity, rendering)
    store.write_chunk(index[0], index[1], scores, mask, overlay, rendering=rendering.id or None)
    return stats


def _redraw_task(
    intensity: Any, unit: Unit, store: Any, index: tuple[int, int], rendering: Rendering
) -> dict[str, float]:
    """Redraw one chunk's mask and overlay from its stored scores (no CNN); its statistics."""
    w = unit.window
    scores = np.asarray(store.read("score")[w.y0 : w.y1, w.x0 : w.x1])
    mask, overlay, stats = redraw_chunk(unit, scores, intensity, rendering)
    store.write_chunk(index[0], index[1], None, mask, overlay, rendering=rendering.id)
    return stats


def redraw_chunks(
    client: Any, intensity: Any, jobs: list[tuple[Unit, tuple[int, int]]], store: Any,
    rendering: Rendering, progress: Any = None,
) -> list[dict[str, float]]:
    """Run :func:`_redraw_task` for each (unit, chunk index), streamed like :func:`detect_chunks`."""
    out = []
    args = [(intensity, u, store, idx, rendering) for u, idx in jobs]
    for k, stats in enumerate(_stream(client, _redraw_task, args, _in_flight(client)), 1):
        out.append(stats)
        if progress is not None:
            progress(k, len(jobs))
    return out


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
    progress: Progress | None = None,
    submitted: Callable[[], None] | None = None,
) -> Dictionary:
    """Fit PCA, scaler and MiniBatchKMeans on the tiles of ``units`` in one backbone pass.

    Memory is bounded by ``max_fit_tiles`` feature rows whatever the number of units: every
    unit contributes random tiles in proportion to the tiles it owns (all of them when every
    training tile fits), streamed from the workers in one pass. PCA is fitted on that sample, k-means is
    seeded on a bounded subset of it (:func:`~anomaly_dask.dictionary.init_kmeans`) and
    refined by ``partial_fit`` over it chunk by chunk, in shuffled order, and the coreset
    memory is chosen from it.

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
    progress : callable, optional
        Told of the ``"sample"`` and ``"fit"`` steps (see :func:`fit_model`).
    submitted : callable, optional
        Called once every training chunk's task has been submitted (to queue work for
        the workers behind them while this process fits).
    """
    rng = np.random.default_rng(random_state)
    order = [units[i] for i in rng.permutation(len(units))]
    owned = np.array([
        (u.window.own_rows[1] - u.window.own_rows[0]) * (u.window.own_cols[1] - u.window.own_cols[0])
        for u in order
    ])
    total = int(owned.sum())
    # a uniform sample of the tiles: each unit's share in proportion to the tiles it owns
    shares = owned if total <= max_fit_tiles else np.maximum(1, owned * max_fit_tiles // max(total, 1))
    # two seeds per unit are drawn, as when training had a second pass, so that models of
    # training sets that fit the sample stay as they were; only the first is used
    seeds = rng.integers(0, 2**31, size=(len(order), 2))
    jobs = [(extractor, u, int(shares[i]), int(seeds[i, 0])) for i, u in enumerate(order)]

    def all_jobs() -> Iterator[tuple]:
        yield from jobs
        if submitted is not None:
            submitted()

    stream = _stream(client, _sample_task, all_jobs(), _in_flight(client), ordered=True)
    sample_parts = list(_counted(stream, progress, "sample", len(jobs)))
    sample = np.concatenate(sample_parts)
    log.info("fitting PCA on %d tile features of dimension %d", *sample.shape)
    dictionary = fit_projection(sample, pca_variance, random_state)
    projected = dictionary.transform(sample)
    log.info("PCA keeps %d components; seeding k-means (k=%d)", projected.shape[1], n_clusters)
    with ThreadPoolExecutor(1) as pool, _openmp_threads(_half_cores() if memory_size else None):
        # the coreset does not depend on the k-means: chosen in a second thread meanwhile, the
        # k-means on half the cores (its OpenMP threads would otherwise contend with it)
        memory = pool.submit(coreset, projected, memory_size, random_state) if memory_size else None
        mbk = init_kmeans(projected, n_clusters, n_init, random_state, batch_size)
        if memory is not None:
            dictionary = dataclasses.replace(dictionary, memory=memory.result())
            log.info("coreset memory of %d of %d sampled tiles", len(dictionary.memory), len(projected))
    del sample, projected
    parts: Iterable[np.ndarray] = (dictionary.transform(p) for p in sample_parts)
    for z in _counted(parts, progress, "fit", len(sample_parts)):
        for k in range(0, len(z), batch_size):
            batch = z[k : k + batch_size]
            if len(batch) >= mbk.n_clusters:
                mbk.partial_fit(batch)
    return dataclasses.replace(dictionary, centroids=mbk.cluster_centers_.astype(np.float32))


def _half_cores() -> int:
    """Half this process's cores (at least 1): each of two fits run side by side gets one half."""
    return max(1, (os.cpu_count() or 1) // 2)


def _openmp_threads(n: int | None) -> contextlib.AbstractContextManager[Any]:
    """OpenMP parallel regions started from this thread use at most ``n`` threads inside
    the block (no limit with None)."""
    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(n, user_api="openmp")


def sample_pixel_scores(
    client: Any, extractor: Any, dictionary: Any, units: list[Unit], n_neighbors: int, step: int,
    progress: Progress | None = None, ahead: list[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The units' valid raw pixel scores on a lattice of every ``step``-th row and column.

    ``progress("calibrate", done, len(units))`` is called as chunks finish (see :func:`fit_model`).
    ``ahead`` holds futures of the :meth:`~anomaly_dask.scoring.Extractor.chunk_features`
    of the first units, submitted earlier; each is released once its unit is scored.

    Returns
    -------
    scores : ndarray of float32
    distance : ndarray of float32
        Each pixel's distance to no-data, capped (see :meth:`Extractor.pixel_scores`); inf
        where its chunk has none within the cap.
    labels : ndarray of int
        Each pixel's nearest centroid (see :meth:`Extractor.pixel_scores`).
    """
    ahead = list(ahead or [])

    def jobs() -> Iterator[tuple]:
        for k, u in enumerate(units):
            features = ahead[k] if k < len(ahead) else None
            if k < len(ahead):
                ahead[k] = None  # the task holds the future now; it is released with it
            yield (extractor, dictionary, u, n_neighbors, step, features)

    stream = _stream(client, _pixel_sample_task, jobs(), _in_flight(client), ordered=True)
    both = np.concatenate(list(_counted(stream, progress, "calibrate", len(units))))
    return both[:, 0], both[:, 1], both[:, 2].astype(np.int64)


def score_blocks(
    client: Any, extractor: Any, dictionary: Any, units: list[Unit], n_neighbors: int
) -> Iterator[tuple[Unit, np.ndarray]]:
    """Pixel scores of each unit, yielded in unit order with a bounded number in flight
    (so a whole mosaic is never held at once)."""
    jobs = [(extractor, dictionary, u, n_neighbors) for u in units]
    yield from zip(units, _stream(client, _pixel_score_task, jobs, _in_flight(client), ordered=True))


def score_array(
    extractor: Any, dictionary: Any, source: ImageSource, grid: TileGrid, chunk: int, n_neighbors: int,
    client: Any = None,
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
    client : distributed.Client, optional
        The client that will compute the array: the model is sent to its workers once now.
    """
    if client is not None:
        extractor, dictionary = scatter(client, extractor, dictionary)
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
