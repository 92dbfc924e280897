"""Training a detector: planning the chunks, the intensity map, the fit and the calibration.

:class:`~anomaly_dask.detector.AnomalyDetector` delegates :meth:`train` here; the passes
over the cluster are :func:`anomaly_dask.compute.fit_model`, the per-chunk work
:mod:`anomaly_dask.scoring`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from . import compute
from .backbones import build_backbone, resolve_weights
from .calibration import decision_rule, distance_classes, fit_calibration
from .dictionary import Dictionary
from .errors import ImageReadError
from .grid import TileGrid
from .intensity import Intensity, fit_intensity
from .io import ImageSource
from .scoring import Extractor, Unit, plan_units

if TYPE_CHECKING:
    from .detector import AnomalyDetector

__all__ = ["calibrate", "calibration_step", "split_units", "train_detector", "training_dtype"]

log = logging.getLogger("anomaly_dask")

#: Most validation pixels sampled for calibration (on a lattice of every n-th row and
#: column, n chosen to stay under this).
CALIBRATION_PIXELS = 2_000_000

#: A calibration group needs the area of this many tiles (in sampled pixels, and at least
#: :data:`MIN_GROUP_SAMPLES`); smaller groups fall back to a coarser one.
MIN_GROUP_TILES = 16
MIN_GROUP_SAMPLES = 1000

#: Neighbouring pixel scores share most of their tiles, so a tile's area of pixels is about
#: one independent sample. Each group's empirical curve stops where this many tiles' worth
#: of its samples remain above; beyond, its tail is a generalised Pareto fitted on those samples.
TAIL_TILES = 30


def calibration_step(val_units: list[Unit]) -> int:
    """Validation pixels are sampled on a lattice of every ``step``-th row and column,
    ``step`` the smallest that keeps the sample under :data:`CALIBRATION_PIXELS`."""
    area = sum(u.window.shape[0] * u.window.shape[1] for u in val_units)
    return max(1, int(np.ceil(np.sqrt(area / CALIBRATION_PIXELS))))


def calibrate(
    det: AnomalyDetector,
    extractor: Extractor,
    dictionary: Dictionary,
    sample: tuple[np.ndarray, np.ndarray, np.ndarray],
    grid: TileGrid,
    step: int,
    s: dict[str, Any],
) -> Dictionary:
    """``dictionary`` with its calibration fitted on a sample of raw validation pixel
    scores (``scores, distance, labels``) taken on the lattice of every ``step``-th pixel."""
    scores, distance, labels = sample
    edges = extractor.distance_edges(grid)
    per_tile = grid.tile_h * grid.tile_w / step**2  # sampled pixels in one tile's area
    least = max(MIN_GROUP_SAMPLES, round(MIN_GROUP_TILES * per_tile))
    classes = distance_classes(distance, edges) if len(edges) else np.zeros(len(scores), dtype=np.int64)
    calibration = fit_calibration(
        scores, labels, classes, len(dictionary.centroids), edges,
        grouping=s["calibration_groups"], min_samples=least, tail=max(30, round(TAIL_TILES * per_tile)),
    )
    log.info(
        "calibrated on %d validation pixels (every %d px): %d groups of at least %d",
        len(scores), step, calibration.n_groups, least,
    )
    return dataclasses.replace(dictionary, calibration=calibration)


def split_units(det: AnomalyDetector, train: Any, val: Any, s: dict[str, Any], rng: np.random.Generator
) -> tuple[list[Unit], list[Unit], list[ImageSource]]:
    """Training and validation units of ``train`` / ``val`` (see :meth:`AnomalyDetector.train`), and the training sources."""
    sources = [det._open(f, s, match=False) for f in det._collect(train, s)]
    det.input_dtype_ = training_dtype([src for src, _ in sources])
    chunk = s["chunk_size"]
    if val is not None:
        val_sources = [det._open(f, s) for f in det._collect(val, s)]
        return (
            [u for src, g in sources for u in plan_units(src, g, chunk, owners=True)],
            [u for src, g in val_sources for u in plan_units(src, g, chunk)],
            [src for src, _ in sources],
        )
    if len(sources) >= 2:
        n_val = min(len(sources) - 1, max(1, round(s["val_fraction"] * len(sources))))
        perm = rng.permutation(len(sources))
        val_idx = set(perm[:n_val].tolist())
        log.info("no validation images given: %d of %d training images used for validation", n_val, len(sources))
        tr = [u for i, (src, g) in enumerate(sources) if i not in val_idx for u in plan_units(src, g, chunk, owners=True)]
        va = [u for i, (src, g) in enumerate(sources) if i in val_idx for u in plan_units(src, g, chunk)]
        return tr, va, [src for src, _ in sources]
    # One image, no validation: split it by regions.
    src, g = sources[0]
    small = min(chunk, max(4 * max(g.tile_h, g.tile_w), min(src.height, src.width) // 4))
    units = plan_units(src, g, small, owners=True)
    if len(units) < 2:
        raise ImageReadError(
            f"{src.name}: a single image of {src.height}x{src.width} px is too small to split "
            f"into training and validation regions; pass val= or more training images"
        )
    n_val = min(len(units) - 1, max(1, round(s["val_fraction"] * len(units))))
    perm = rng.permutation(len(units))
    log.info("one training image, no validation: %d of its %d regions used for validation", n_val, len(units))
    return [units[i] for i in perm[n_val:]], [units[i] for i in perm[:n_val]], [src]


def fit_input_intensity(det: AnomalyDetector, sources: list[ImageSource], rng: np.random.Generator) -> Intensity:
    """The intensity map of a training set, from sampled windows of its images."""
    samples = []
    for src in sources[:64]:
        h, w = min(src.height, 512), min(src.width, 512)
        for _ in range(4):
            y = int(rng.integers(0, src.height - h + 1))
            x = int(rng.integers(0, src.width - w + 1))
            samples.append(src.read(y, y + h, x, x + w)[::4, ::4])
    nodata = det.nodata if det.nodata is not None else next(
        (src.nodata for src in sources if src.nodata is not None), None
    )
    return fit_intensity(sources, samples, nodata)


def train_detector(
    det: AnomalyDetector, train: Any, val: Any = None, progress: compute.Progress | None = None
) -> AnomalyDetector:
    """Body of :meth:`AnomalyDetector.train <anomaly_dask.detector.AnomalyDetector.train>`;
    ``progress`` is passed to :func:`anomaly_dask.compute.fit_model`."""
    s = det._settings()
    t0 = time.perf_counter()
    seed = s["random_state"]
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    rng = np.random.default_rng(seed)
    train_units, val_units, train_sources = split_units(det, train, val, s, rng)
    budget = s["max_train_chunks"]
    if len(train_units) > budget:
        log.info("training on a random %d of %d chunks (max_train_chunks)", budget, len(train_units))
        train_units = [train_units[i] for i in np.sort(rng.choice(len(train_units), budget, replace=False))]
    val_units = at_most(val_units, max(8, budget // 4), rng)
    det.intensity_ = fit_input_intensity(det, train_sources, rng)
    weights_id, state = resolve_weights(s["backbone"], s["weights"])
    det.backbone_ = build_backbone(
        s["backbone"], state, tuple(s["layers"]) if s["layers"] else None, seed=seed,
        dense_only=s["features"] == "dense",
    )
    det.weights_id_ = weights_id
    det.random_state_ = seed
    log.info(
        "training on %d chunks (%d validation chunks), backbone %s (%s), %s features",
        len(train_units), len(val_units), s["backbone"], weights_id, s["features"],
    )
    extractor = det._extractor(s)
    step = calibration_step(val_units)
    dictionary, sample = compute.fit_model(
        s["client"], extractor, train_units, val_units,
        calibration_step=step, n_neighbors=s["kmeans_neighbors"],
        pca_variance=s["pca_variance"], n_clusters=s["kmeans_clusters"],
        n_init=s["kmeans_trials"], max_fit_tiles=s["max_fit_tiles"], random_state=seed,
        memory_size=s["memory_size"], progress=progress,
    )
    dictionary = calibrate(det, extractor, dictionary, sample, val_units[0].grid, step, s)
    det.dictionary_ = dictionary
    det.threshold_, det.false_alarm_rate_ = decision_rule(
        s["threshold_mode"], s["false_alarm_rate"], s["cdf"], s["zscore"], s["threshold"]
    )
    det.calibration_summary_ = dictionary.calibration.summary()
    det.n_components_ = int(dictionary.pca_components.shape[0])
    det.fingerprint_ = None
    log.info(
        "trained in %.1f s: %d PCA components, %d centroids, threshold %.3f (marks %.3g of normal pixels)",
        time.perf_counter() - t0, det.n_components_, len(dictionary.centroids),
        det.threshold_, det.false_alarm_rate_,
    )
    return det


def training_dtype(sources: list[ImageSource]) -> str:
    """The pixel type of a training set (``"mixed"`` for several float / signed types).

    Raises
    ------
    ImageReadError
        When 8-bit and 16-bit images are mixed: their values mean different things.
    """
    names = sorted({np.dtype(src.dtype).name for src in sources})
    if len(names) == 1:
        return names[0]
    if {"uint8", "uint16"} & set(names):
        example = {np.dtype(src.dtype).name: src.name for src in sources}
        raise ImageReadError(
            f"training images mix pixel types {names} (e.g. {example}); convert them to one bit "
            f"depth (all 8-bit or all 16-bit) before training"
        )
    return "mixed"


def at_most(units: list[Unit], n: int, rng: np.random.Generator) -> list[Unit]:
    """``units``, or a random ``n`` of them in their order when there are more."""
    if len(units) <= n:
        return units
    return [units[i] for i in np.sort(rng.choice(len(units), n, replace=False))]
