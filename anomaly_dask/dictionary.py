"""The dictionary of normal tiles: PCA, scaler, k-means centroids, tile scores, threshold.

Pure numpy (scikit-learn only to fit); no IO, no Dask. Fitting is split in steps so that the
orchestrator can stream features: :func:`fit_projection` on a bounded sample,
:func:`init_kmeans` on that sample, then ``MiniBatchKMeans.partial_fit`` on streamed batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA

from .errors import ParameterError

__all__ = [
    "CONTEXT_LEVELS",
    "Dictionary",
    "context_classes",
    "distance_classes",
    "distance_offsets",
    "group_offsets",
    "rate_offsets",
    "fit_projection",
    "init_kmeans",
    "threshold_from_scores",
]

#: Boundaries of the context classes of tiles near no-data (see :func:`context_classes`).
CONTEXT_LEVELS = (1.0, 0.9, 0.75, 0.6)

#: Boundaries of the distance classes of pixels near no-data, in tiles (see
#: :func:`distance_classes`).
DISTANCE_EDGES = (4.0, 2.0, 1.0, 0.5, 0.25)


def context_classes(context: np.ndarray, partial: np.ndarray | None, levels: np.ndarray) -> np.ndarray:
    """Context class of each tile, from how much no-data the backbone saw around and in it.

    A tile wholly on data whose surroundings are too is class 0. Other tiles wholly on data
    take classes 1 to ``m`` by how many of the ``m`` decreasing ``levels`` their
    surroundings' valid share falls below; tiles partly in no-data take classes ``m + 1``
    to ``2 m`` the same way (their share is always below ``levels[0] = 1``).

    Parameters
    ----------
    context : ndarray
        Valid share of each tile's surroundings (the tile grown by a margin), in ``[0, 1]``.
    partial : ndarray of bool or None
        Tiles that are themselves partly in no-data; None when none is.
    levels : ndarray (m,)
        Decreasing class boundaries, the first one 1.

    Returns
    -------
    ndarray of int, same shape as ``context``, in ``[0, 2 m]``.
    """
    c = np.asarray(context, dtype=np.float32)
    levels = np.asarray(levels, dtype=np.float32)
    classes = (c[..., None] < levels).sum(axis=-1)
    if partial is not None:
        classes = np.where(partial, len(levels) + np.maximum(classes, 1), classes)
    return classes


def distance_classes(distance: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Distance class of each pixel: how many of the decreasing ``edges`` its distance to
    no-data falls below.

    Parameters
    ----------
    distance : ndarray
        Distance of each pixel to the nearest no-data pixel, pixels (only values below
        ``edges[0]`` need be exact).
    edges : ndarray (m,)
        Decreasing class boundaries, pixels.

    Returns
    -------
    ndarray of int, same shape as ``distance``, in ``[0, m]``; 0 is at least ``edges[0]``
    from no-data.
    """
    d = np.asarray(distance, dtype=np.float32)
    return (d[..., None] < np.asarray(edges, dtype=np.float32)).sum(axis=-1)


def distance_offsets(
    scores: np.ndarray, classes: np.ndarray, n_classes: int, threshold: float, min_pixels: int = 1000
) -> np.ndarray:
    """Per-class pixel-score offsets that mark each distance class as often as the interior.

    Pixel scores average many overlapping tiles, so a per-tile calibration does not carry
    over to pixels: where high tile scores cluster (the far range of a sonar swath, along
    no-data) pixel scores cross the threshold far more often than where they are scattered.
    This matches the rates on validation pixels instead. With ``p`` the share of interior
    (class 0) pixels below ``threshold``, a class with at least ``min_pixels`` samples gets
    ``max(0, q - threshold)``, ``q`` being its own ``p`` quantile; subtracted from its
    pixels' scores, it leaves that class marked at the interior rate. Offsets are never
    negative, and all are 0 when the interior has fewer than ``min_pixels`` samples.

    Parameters
    ----------
    scores : ndarray (n,)
        Validation pixel scores (a sample).
    classes : ndarray of int (n,)
        Distance class of each (see :func:`distance_classes`), in ``[0, n_classes)``.
    n_classes : int
        Number of classes.
    threshold : float
        The global threshold.
    min_pixels : int
        Fewest samples a class (and the interior) needs.

    Returns
    -------
    ndarray of float32, shape (n_classes,)
    """
    interior = scores[classes == 0]
    if len(interior) < min_pixels:
        return np.zeros(n_classes, dtype=np.float32)
    offsets = rate_offsets(scores, classes, n_classes, threshold, float(np.mean(interior < threshold)), min_pixels)
    offsets[0] = 0.0
    return offsets


def rate_offsets(
    scores: np.ndarray, groups: np.ndarray, n_groups: int, threshold: float, below: float, min_pixels: int = 1000
) -> np.ndarray:
    """Per-group offsets after which at least a share ``below`` of each group's scores lies
    below ``threshold``.

    A group with at least ``min_pixels`` scores gets ``max(0, q - threshold)``, ``q`` being
    its own ``below`` quantile; other groups get 0. Offsets are never negative.

    Parameters
    ----------
    scores : ndarray (n,)
    groups : ndarray of int (n,)
        Group of each score, in ``[0, n_groups)``.
    n_groups : int
    threshold : float
    below : float
        Target share of each group below ``threshold``, in [0, 1].
    min_pixels : int
        Fewest scores a group needs for an offset.

    Returns
    -------
    ndarray of float32, shape (n_groups,)
    """
    offsets = np.zeros(n_groups, dtype=np.float32)
    counts = np.bincount(groups, minlength=n_groups)
    for k in np.flatnonzero(counts >= min_pixels):
        offsets[k] = max(0.0, float(np.quantile(scores[groups == k], below)) - threshold)
    return offsets


@dataclass
class Dictionary:
    """Learned state that turns tile features into anomaly scores.

    Attributes
    ----------
    pca_mean : ndarray (D,)
    pca_components : ndarray (d, D)
    scaler_mean, scaler_scale : ndarray (d,)
        StandardScaler fitted on the PCA projections.
    centroids : ndarray (k, d)
        k-means centres of normal tiles, in scaled PCA space.
    offsets : ndarray (k,), optional
        Per-centroid score offsets (see :func:`group_offsets`), subtracted from the score
        of each tile according to its nearest centroid.
    context_levels : ndarray (m,), optional
        Boundaries of the context classes (see :func:`context_classes`).
    context_offsets : ndarray (2 m + 1,), optional
        Score offsets of tiles by context class (0 for class 0), subtracted after the
        centroid offsets: tiles near no-data are judged against validation tiles with as
        much no-data around and in them.
    distance_edges : ndarray (m,), optional
        Boundaries, in pixels, of the distance classes of pixels near no-data (see
        :func:`distance_classes`).
    distance_offsets : ndarray (m + 1,), optional
        Offsets subtracted from pixel scores by distance class (see
        :func:`distance_offsets`; 0 for class 0).
    pixel_offsets : ndarray (k,), optional
        Offsets subtracted from pixel scores by the nearest centroid of the tile centred
        nearest each pixel (see :func:`rate_offsets`), before the distance offsets.
    """

    pca_mean: np.ndarray
    pca_components: np.ndarray
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    centroids: np.ndarray | None = None
    offsets: np.ndarray | None = None
    context_levels: np.ndarray | None = None
    context_offsets: np.ndarray | None = None
    distance_edges: np.ndarray | None = None
    distance_offsets: np.ndarray | None = None
    pixel_offsets: np.ndarray | None = None

    def __setattr__(self, name: str, value: object) -> None:
        # One memory layout whatever the origin (fit or file), so BLAS rounds identically.
        if value is not None:
            value = np.ascontiguousarray(value, dtype=np.float32)
        super().__setattr__(name, value)

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Project features (n, D) into scaled PCA space (n, d), float32."""
        z = (features.astype(np.float32) - self.pca_mean) @ self.pca_components.T
        return ((z - self.scaler_mean) / self.scaler_scale).astype(np.float32)

    def score(
        self,
        features: np.ndarray,
        n_neighbors: int = 1,
        context: np.ndarray | None = None,
        partial: np.ndarray | None = None,
    ) -> np.ndarray:
        """Mean Euclidean distance of each tile to its ``n_neighbors`` nearest centroids,
        less the nearest centroid's offset when ``offsets`` is set, less the tile's context
        offset when ``context_offsets`` is set and ``context`` is given.

        Parameters
        ----------
        features : ndarray (..., D)
            Raw tile features; leading axes are kept.
        n_neighbors : int
            Number of nearest centroids averaged.
        context : ndarray (...), optional
            Valid share of each tile's surroundings; None when all are valid.
        partial : ndarray of bool (...), optional
            Tiles partly in no-data (see :func:`context_classes`).

        Returns
        -------
        ndarray of float32, shape (...)
        """
        return self.score_with_labels(features, n_neighbors, context, partial)[0]

    def score_with_labels(
        self,
        features: np.ndarray,
        n_neighbors: int = 1,
        context: np.ndarray | None = None,
        partial: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score` and the index of each tile's nearest centroid."""
        s, labels = self.score_and_label(features, n_neighbors)
        if self.offsets is not None:
            s = s - self.offsets[labels]
        if context is not None and self.context_offsets is not None:
            s = s - self.context_offsets[context_classes(context, partial, self.context_levels)]
        return s, labels

    def score_and_label(self, features: np.ndarray, n_neighbors: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores (no offsets) and the index of each tile's nearest centroid."""
        if self.centroids is None:
            raise RuntimeError("dictionary has no centroids yet")
        lead = features.shape[:-1]
        z = self.transform(features.reshape(-1, features.shape[-1]))
        c = self.centroids.astype(np.float32)
        d2 = (z * z).sum(1)[:, None] - 2.0 * z @ c.T + (c * c).sum(1)[None, :]
        d = np.sqrt(np.maximum(d2, 0.0))
        k = min(n_neighbors, c.shape[0])
        labels = d.argmin(axis=1)
        if k == 1:
            s = d[np.arange(len(d)), labels]
        else:
            s = np.partition(d, k - 1, axis=1)[:, :k].mean(axis=1)
        return s.astype(np.float32).reshape(lead), labels.reshape(lead)

    def arrays(self) -> dict[str, np.ndarray]:
        """All arrays by name (for the model file)."""
        out = {
            "pca_mean": self.pca_mean,
            "pca_components": self.pca_components,
            "scaler_mean": self.scaler_mean,
            "scaler_scale": self.scaler_scale,
        }
        if self.centroids is not None:
            out["centroids"] = self.centroids
        optional = ("offsets", "context_levels", "context_offsets", "distance_edges", "distance_offsets", "pixel_offsets")
        for name in optional:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def fit_projection(sample: np.ndarray, variance: float, random_state: int | None) -> Dictionary:
    """Fit PCA (keeping ``variance`` of the variance) and a scaler on a feature sample.

    Parameters
    ----------
    sample : ndarray (n, D)
        Tile features, a bounded random sample of the training set.
    variance : float
        Fraction of variance kept, in (0, 1]; 1 keeps every component.
    random_state : int or None
        Seed of the randomised solver.
    """
    n, dim = sample.shape
    if n < 2:
        raise ParameterError(
            "training data gave fewer than 2 tiles; use larger or more images, or a smaller tile"
        )
    n_comp = min(n, dim) if variance >= 1.0 else variance
    pca = PCA(n_components=n_comp, svd_solver="full", random_state=random_state).fit(sample)
    z = pca.transform(sample)
    scale = z.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return Dictionary(
        pca_mean=pca.mean_.astype(np.float32),
        pca_components=pca.components_.astype(np.float32),
        scaler_mean=z.mean(axis=0).astype(np.float32),
        scaler_scale=scale.astype(np.float32),
    )


def init_kmeans(
    projected: np.ndarray, n_clusters: int, n_init: int, random_state: int | None, batch_size: int
) -> MiniBatchKMeans:
    """Seed a MiniBatchKMeans from k-means (``n_init`` restarts) on a projected sample.

    Returns
    -------
    MiniBatchKMeans
        Ready for ``partial_fit`` on streamed batches; its centres start at the sample's
        best k-means solution.
    """
    k = min(n_clusters, len(projected))
    seed = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit(projected)
    mbk = MiniBatchKMeans(
        n_clusters=k,
        init=seed.cluster_centers_,
        n_init=1,
        batch_size=batch_size,
        compute_labels=False,
        random_state=random_state,
    )
    mbk.partial_fit(projected[: max(k, min(len(projected), batch_size))])
    return mbk


def threshold_from_scores(
    scores: np.ndarray, mode: str, cdf: float, zscore: float, manual: float | None
) -> float:
    """Threshold from validation tile scores (the seed's three modes).

    Parameters
    ----------
    scores : ndarray
        Validation tile scores.
    mode : {"cdf", "zscore", "manual"}
        ``"cdf"``: the ``cdf`` quantile; ``"zscore"``: mean + ``zscore`` std;
        ``"manual"``: ``manual`` itself.
    """
    if mode == "manual":
        if manual is None:
            raise ParameterError("threshold_mode='manual' needs threshold=<value>")
        return float(manual)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ParameterError("validation gave no tile scores; give larger or more validation images")
    if mode == "cdf":
        return float(np.quantile(scores, cdf))
    if mode == "zscore":
        return float(scores.mean() + zscore * scores.std())
    raise ParameterError(f"threshold_mode={mode!r} is invalid; use 'cdf', 'zscore' or 'manual'")


def group_offsets(
    scores: np.ndarray,
    labels: np.ndarray,
    n_groups: int,
    threshold: float,
    mode: str,
    cdf: float,
    zscore: float,
    min_tiles: int = 100,
) -> np.ndarray:
    """Per-group score offsets that judge each group's tiles against their own spread.

    Groups are nearest centroids or context classes. Normal but rare or varied appearance
    (sonar nadir bands, swath edges, seams) forms groups whose validation tiles score
    high; with one global threshold they would take most false positives. A group with at
    least ``min_tiles`` validation tiles gets the threshold its own scores give (same rule
    as the global one); where that exceeds the global ``threshold`` the difference becomes
    its offset. Offsets are never negative, so no group is judged more strictly than
    globally.

    Parameters
    ----------
    scores : ndarray (n,)
        Validation tile scores.
    labels : ndarray of int (n,)
        Group of each tile, in ``[0, n_groups)``.
    n_groups : int
        Number of groups.
    threshold : float
        The global threshold.
    mode, cdf, zscore
        Threshold rule, as in :func:`threshold_from_scores`.
    min_tiles : int
        Fewest validation tiles a group needs for its own threshold.

    Returns
    -------
    ndarray of float32, shape (n_groups,)
    """
    offsets = np.zeros(n_groups, dtype=np.float32)
    if mode == "manual":
        return offsets
    for k in range(n_groups):
        own = scores[labels == k]
        if len(own) >= min_tiles:
            offsets[k] = max(0.0, threshold_from_scores(own, mode, cdf, zscore, None) - threshold)
    return offsets
