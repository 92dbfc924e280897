"""Calibration of pixel scores: group-conditional split-conformal p-values on normal pixels.

A raw pixel score (the mean distance of the tiles covering a pixel to their nearest
centroids) means different things in different places: tiles of rare or varied normal
appearance (a sonar nadir band, a swath edge, a coarse sediment) lie far from every
centroid, and spatially clustered high tiles push many neighbouring pixels over any one
threshold. One raw threshold therefore marks such places far more often than the rest.

Calibration turns every raw score into the same currency: the share of held-out normal
pixels *of the same group* that score at least as high (a split-conformal p-value),
published as ``-log10(p)``. A pixel at calibrated score 3 is as unusual as one normal
pixel in a thousand of its kind, whatever its kind, so one threshold
(``-log10(false_alarm_rate)``) marks about that share of normal pixels everywhere.

Groups (Mondrian conformal prediction) are the pixel's distance class to no-data
(:data:`DISTANCE_EDGES`) and, within it, the nearest centroid of the tile centred nearest
it. A pixel's calibrated score is the smaller of its class's value and its centroid
group's: the centroid group relieves rare, varied normal appearance but never marks more
than the class would (see :meth:`Calibration.apply`). A group with fewer than
``min_samples`` calibration pixels falls back to its distance class, and a distance class
with too few to the pooled sample. Within a group, scores up
to the top ``tail`` samples (at most a tenth of the group) follow the empirical conformal
p-value; beyond them the
survival follows a generalised Pareto distribution fitted to the excesses by moments
(peaks over a threshold), so that scores stay ordered past the largest calibration sample
instead of saturating at ``1 / (n + 1)``, and a light tail is not extrapolated as an
exponential one.

Pure numpy: no IO, no Dask.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import erfc, log, sqrt

import numpy as np

from .errors import ModelFileError, ParameterError

__all__ = [
    "DISTANCE_EDGES",
    "GROUPINGS",
    "Calibration",
    "decision_rule",
    "distance_classes",
    "fit_calibration",
    "threshold_for_rate",
]

#: Boundaries of the distance classes of pixels near no-data, in tiles (see
#: :func:`distance_classes`).
DISTANCE_EDGES = (4.0, 2.0, 1.0, 0.5, 0.25)

#: How calibration pixels are grouped: by nearest centroid within each distance class to
#: no-data (falling back to the class, then to all), by distance class only, or not at all.
GROUPINGS = ("centroid", "distance", "global")

#: Knots of each group's empirical curve (log-spaced in survival).
N_KNOTS = 96


def distance_classes(distance: np.ndarray | None, edges: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Distance class of each pixel: how many of the decreasing ``edges`` its distance to
    no-data falls below (0: at least ``edges[0]`` from no-data).

    Parameters
    ----------
    distance : ndarray or None
        Distance of each pixel to the nearest no-data pixel, pixels (only values below
        ``edges[0]`` need be exact); None means far from any (class 0 everywhere, of
        ``shape``).
    edges : ndarray (m,)
        Decreasing class boundaries, pixels.
    shape : tuple, optional
        Output shape when ``distance`` is None.

    Returns
    -------
    ndarray of int64 in ``[0, m]``.
    """
    if distance is None:
        return np.zeros(shape or (), dtype=np.int64)
    d = np.asarray(distance, dtype=np.float32)
    rising = np.sort(np.asarray(edges, dtype=np.float32))
    return len(rising) - np.searchsorted(rising, d, side="right").astype(np.int64)  # edges above d


def threshold_for_rate(rate: float) -> float:
    """Calibrated threshold that marks a share ``rate`` of normal pixels: ``-log10(rate)``."""
    if not 0.0 < rate <= 1.0:
        raise ParameterError(f"false_alarm_rate={rate!r} must be in (0, 1]")
    return float(-np.log10(rate))


def decision_rule(
    mode: str | None, false_alarm_rate: float, cdf: float, zscore: float, manual: float | None
) -> tuple[float, float]:
    """Threshold on calibrated scores and the share of normal pixels it marks.

    Every rule names a false-alarm rate ``a`` and thresholds at ``-log10(a)``:

    - ``None`` (default): ``a = false_alarm_rate``;
    - ``"cdf"`` (the seed's): ``a = 1 - cdf``, i.e. the ``cdf`` quantile of normal pixels;
    - ``"zscore"``: ``a`` is the upper tail of a standard normal beyond ``zscore`` (the share
      the seed's mean + ``zscore`` std rule marks of Gaussian scores: 1.645 gives 5 %);
    - ``"manual"``: the threshold is ``manual`` itself, in calibrated units, so ``a = 10**-manual``.

    Returns
    -------
    threshold : float
    rate : float
    """
    if mode is None:
        rate = false_alarm_rate
    elif mode == "cdf":
        rate = 1.0 - cdf
    elif mode == "zscore":
        rate = 0.5 * erfc(zscore / sqrt(2.0))
    elif mode == "manual":
        if manual is None:
            raise ParameterError("threshold_mode='manual' needs threshold=<calibrated score>")
        return float(manual), float(10.0 ** -float(manual))
    else:
        raise ParameterError(f"threshold_mode={mode!r} is invalid; use None, 'cdf', 'zscore' or 'manual'")
    rate = min(1.0, max(float(rate), 1e-300))
    return threshold_for_rate(rate), rate


def check_array(
    name: str, value: np.ndarray, dtype: type | np.dtype, shape: tuple[int | None, ...]
) -> np.ndarray:
    """Check an array read from a model file: its dtype, its shape and, for floats, finiteness.

    Parameters
    ----------
    name : str
        Tensor name used in messages (as in the model file).
    value : ndarray
    dtype : numpy dtype
        The exact dtype expected.
    shape : tuple of int or None
        Expected shape; None accepts any length along that axis.

    Returns
    -------
    ndarray
        ``value``, unchanged.

    Raises
    ------
    ModelFileError
        Naming the tensor and what is wrong with it.
    """
    expected = np.dtype(dtype)
    if not isinstance(value, np.ndarray) or value.dtype != expected:
        found = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise ModelFileError(f"{name}: dtype {found} where {expected} is expected")
    wanted = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    if value.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        raise ModelFileError(f"{name}: shape {value.shape} where {wanted} is expected")
    if expected.kind == "f" and not np.isfinite(value).all():
        raise ModelFileError(f"{name}: holds NaN or infinite values")
    return value


#: Range of the fitted tail shape (generalised Pareto); 0 is an exponential tail.
SHAPE_RANGE = (-0.5, 0.45)

#: Share of the way to a light tail's end point (shape < 0) past which the calibrated score
#: rises linearly instead of without bound.
END_SHARE = 0.99


def _curve(sorted_scores: np.ndarray, n_knots: int, tail: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Knots (raw scores, increasing), calibrated values at them, and the tail's shape and
    scale.

    The value at raw score ``s`` is ``-log10((1 + #{x >= s}) / (n + 1))`` over the ``n``
    calibration scores. Beyond the knot at the top ``tail`` samples, their excesses over it
    follow a generalised Pareto distribution whose shape and scale are fitted by moments
    (shape clipped to :data:`SHAPE_RANGE`): an exponential tail when the excesses' mean and
    standard deviation agree, a lighter one (shape < 0) or a heavier one (shape > 0) when
    they do not.
    """
    x = np.asarray(sorted_scores, dtype=np.float64)
    n = len(x)
    k = int(min(max(1, tail), max(1, n // 10), n - 1))  # the top tenth at most
    u = x[n - k - 1]  # the tail starts above the (k + 1)-th largest score
    excess = x[n - k :] - u
    mean = float(excess.mean())
    spread = float(x[-1] - x[0])
    mean = max(mean, 1e-6 * max(spread, 1e-6))
    var = float(excess.var())
    shape = 0.5 * (1.0 - mean * mean / var) if var > 0 else SHAPE_RANGE[0]
    shape = float(np.clip(shape, *SHAPE_RANGE))
    scale = mean * (1.0 - shape)  # the mean excess of a generalised Pareto is scale / (1 - shape)
    p_u = (k + 2) / (n + 1)
    survival = np.geomspace(1.0, p_u, n_knots)
    idx = np.clip(n - np.round(survival * (n + 1)).astype(np.int64), 0, n - k - 1)
    knots = np.unique(np.r_[x[idx], u])
    at_least = n - np.searchsorted(x, knots, side="left")
    values = -np.log10((1.0 + at_least) / (n + 1.0))
    return knots, values, shape, scale


def _tail_value(t: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``-log10`` of a generalised Pareto survival at excess ``t >= 0`` (relative to the
    survival at the tail's start), continued linearly near a light tail's end point."""
    t = np.asarray(t, dtype=np.float64)
    out = t / (scale * log(10.0))  # shape 0: exponential
    curved = shape != 0
    if curved.any():
        xi, sc, tt = shape[curved], scale[curved], t[curved]
        end = np.where(xi < 0, END_SHARE * sc / np.maximum(-xi, 1e-12), np.inf)
        head = np.minimum(tt, end)
        v = np.log10(1.0 + xi * head / sc) / xi
        slope_end = 1.0 / (log(10.0) * (sc + xi * np.where(np.isfinite(end), end, 0.0)))
        out[curved] = v + np.where(tt > head, (tt - head) * slope_end, 0.0)
    return out


@dataclass
class Calibration:
    """Per-group curves from raw pixel scores to ``-log10`` of a conformal p-value.

    Attributes
    ----------
    distance_edges : ndarray (m,)
        Boundaries of the distance classes to no-data, pixels (decreasing).
    table : ndarray of int (m + 1, k)
        Group of a pixel by distance class and nearest centroid (fallbacks resolved).
    knots : ndarray (G, K)
        Raw scores of each group's curve, strictly increasing along each row.
    values : ndarray (G, K)
        Calibrated scores at the knots (0 at the first knot).
    tail_shape, tail_scale : ndarray (G,)
        Generalised Pareto shape and scale of each group's tail beyond its last knot.
    counts : ndarray (G,)
        Calibration pixels of each group.
    parents : ndarray of int (G,)
        The next coarser group of each (-1 for the pooled group).
    """

    distance_edges: np.ndarray
    table: np.ndarray
    knots: np.ndarray
    values: np.ndarray
    tail_shape: np.ndarray
    tail_scale: np.ndarray
    counts: np.ndarray
    parents: np.ndarray

    def __post_init__(self) -> None:
        self.distance_edges = np.ascontiguousarray(self.distance_edges, dtype=np.float32)
        self.table = np.ascontiguousarray(self.table, dtype=np.int64)
        self.parents = np.ascontiguousarray(self.parents, dtype=np.int64)
        for name in ("knots", "values", "tail_shape", "tail_scale", "counts"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float64))

    @property
    def n_groups(self) -> int:
        """Number of distinct groups (pooled, distance classes and fine groups)."""
        return int(self.knots.shape[0])

    def groups(self, labels: np.ndarray, distance: np.ndarray | None) -> np.ndarray:
        """Group index of each pixel from its nearest centroid and distance to no-data."""
        labels = np.asarray(labels, dtype=np.int64)
        d = distance_classes(distance, self.distance_edges, labels.shape)
        return self.table[d, labels]

    def _curve_values(self, s: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Group ``g``'s curve at raw scores ``s`` (both 1-D, finite)."""
        n_knots = self.knots.shape[1]
        lo, hi = self.knots[g, 0], self.knots[g, -1]
        inside = np.clip(s, lo, hi)
        # one searchsorted over every group's knots, each group shifted past the previous
        base = float(self.knots[:, 0].min())
        step = float(self.knots[:, -1].max() - base) + 1.0
        shift = np.arange(self.n_groups, dtype=np.float64)[:, None] * step
        flat_knots = ((self.knots - base) + shift).ravel()
        j = np.searchsorted(flat_knots, (inside - base) + g * step, side="right") - 1
        j = np.clip(j, g * n_knots, g * n_knots + n_knots - 2)
        k0, k1 = self.knots.ravel()[j], self.knots.ravel()[j + 1]
        v0, v1 = self.values.ravel()[j], self.values.ravel()[j + 1]
        t = np.clip((inside - k0) / (k1 - k0), 0.0, 1.0)
        out = v0 + t * (v1 - v0)
        past = np.flatnonzero(s > hi)  # the tail adds nothing at or below the last knot
        if past.size:
            gp = g[past]
            out[past] += _tail_value(s[past] - hi[past], self.tail_shape[gp], self.tail_scale[gp])
        return out

    def apply(self, scores: np.ndarray, labels: np.ndarray, distance: np.ndarray | None) -> np.ndarray:
        """Calibrated scores (``-log10`` p-values, float32) of raw pixel scores.

        A pixel's value is the smaller of its centroid group's and its distance class's:
        it is as unusual as the less unusual of the two views makes it. A centroid group's
        curve can thus only lower a value: it relieves rare, varied normal appearance whose
        own spread is wide, and a group estimated from fewer pixels (noisier in its tail)
        never marks more than its distance class would. Distance classes stand alone (a
        pixel near no-data is judged only against pixels as near).

        Parameters
        ----------
        scores : ndarray
            Raw pixel scores; NaN (no-data) stays NaN.
        labels : ndarray of int, same shape
            Nearest centroid of the tile centred nearest each pixel.
        distance : ndarray or None, same shape
            Distance to no-data (see :func:`distance_classes`).
        """
        s = np.asarray(scores, dtype=np.float64)
        flat_s = s.ravel()
        finite = np.isfinite(flat_s)
        x = flat_s[finite]
        g = self.groups(labels, distance).ravel()[finite]
        out = self._curve_values(x, g)
        up = self.parents[g]
        while (up >= 0).any():
            sel = np.flatnonzero(up >= 0)
            out[sel] = np.minimum(out[sel], self._curve_values(x[sel], up[sel]))
            up[sel] = self.parents[up[sel]]
        result = np.full(flat_s.shape, np.nan)
        result[finite] = out
        return result.reshape(s.shape).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        """All arrays by name (for the model file)."""
        return {
            "distance_edges": self.distance_edges.astype(np.float32),
            "table": self.table.astype(np.int32),
            "knots": self.knots,
            "values": self.values,
            "tail_shape": self.tail_shape,
            "tail_scale": self.tail_scale,
            "counts": self.counts,
            "parents": self.parents.astype(np.int32),
        }

    def summary(self) -> dict[str, int]:
        """Groups and calibration pixels (the pooled group holds them all)."""
        return {"groups": self.n_groups, "pixels": int(self.counts[0])}

    @staticmethod
    def check_arrays(arrays: dict[str, np.ndarray], n_labels: int) -> None:
        """Check calibration arrays read from a model file (names as :meth:`arrays` gives).

        Rules: exactly the names of :meth:`arrays` with their dtypes; ``distance_edges``
        (m,) with m at most ``len(DISTANCE_EDGES)``, positive and strictly decreasing;
        ``knots`` and ``values`` (G, K) with G >= 1 and K >= 2, knots non-negative and
        strictly increasing along each row, values non-negative; ``tail_shape``,
        ``tail_scale``, ``counts`` and ``parents`` (G,), shapes within :data:`SHAPE_RANGE`,
        scales positive, counts non-negative, each parent -1 or an earlier group (so the
        fallback chain ends); ``table`` (m + 1, n_labels) of groups in ``[0, G)``, G at most
        ``1 + (m + 1) (n_labels + 1)``. Every float finite.

        Parameters
        ----------
        arrays : dict of str to ndarray
            Without the ``calibration.`` prefix.
        n_labels : int
            Number of centroids of the dictionary.

        Raises
        ------
        ModelFileError
            Naming the first array that breaks a rule (``dictionary.calibration.<name>``).
        """
        dtypes = {
            "distance_edges": np.float32, "table": np.int32, "knots": np.float64, "values": np.float64,
            "tail_shape": np.float64, "tail_scale": np.float64, "counts": np.float64, "parents": np.int32,
        }
        prefix = "dictionary.calibration."
        missing, unknown = sorted(set(dtypes) - set(arrays)), sorted(set(arrays) - set(dtypes))
        if missing or unknown:
            raise ModelFileError(
                f"{prefix}*: calibration tensors missing {[prefix + k for k in missing]}, "
                f"unknown {[prefix + k for k in unknown]}"
            )

        def get(name: str, shape: tuple[int | None, ...]) -> np.ndarray:
            return check_array(prefix + name, arrays[name], dtypes[name], shape)

        edges = get("distance_edges", (None,))
        m = len(edges)
        if m > len(DISTANCE_EDGES) or (edges <= 0).any() or (np.diff(edges) >= 0).any():
            raise ModelFileError(
                f"{prefix}distance_edges: {m} edges {edges.tolist()[:8]}; at most "
                f"{len(DISTANCE_EDGES)} positive, strictly decreasing ones are expected"
            )
        knots = get("knots", (None, None))
        n_groups, n_knots = knots.shape
        most = 1 + (m + 1) * (n_labels + 1)
        if not 1 <= n_groups <= most or n_knots < 2:
            raise ModelFileError(
                f"{prefix}knots: shape {knots.shape}; 1 to {most} groups of at least 2 knots are expected"
            )
        if (knots < 0).any() or (np.diff(knots, axis=1) <= 0).any():
            raise ModelFileError(f"{prefix}knots: must be non-negative and strictly increasing along each row")
        if (get("values", (n_groups, n_knots)) < 0).any():
            raise ModelFileError(f"{prefix}values: calibrated scores must be non-negative")
        shape = get("tail_shape", (n_groups,))
        if ((shape < SHAPE_RANGE[0]) | (shape > SHAPE_RANGE[1])).any():
            raise ModelFileError(f"{prefix}tail_shape: must lie in {list(SHAPE_RANGE)}")
        if (get("tail_scale", (n_groups,)) <= 0).any():
            raise ModelFileError(f"{prefix}tail_scale: must be positive")
        if (get("counts", (n_groups,)) < 0).any():
            raise ModelFileError(f"{prefix}counts: must be non-negative")
        parents = get("parents", (n_groups,))
        if ((parents < -1) | (parents >= np.arange(n_groups))).any():
            raise ModelFileError(f"{prefix}parents: each must be -1 or the index of an earlier group")
        table = get("table", (m + 1, max(1, n_labels)))
        if ((table < 0) | (table >= n_groups)).any():
            raise ModelFileError(f"{prefix}table: groups must be in [0, {n_groups})")


def fit_calibration(
    scores: np.ndarray,
    labels: np.ndarray,
    distance_class: np.ndarray,
    n_labels: int,
    distance_edges: np.ndarray,
    *,
    grouping: str = "centroid",
    min_samples: int = 2000,
    tail: int | None = None,
    n_knots: int = N_KNOTS,
) -> Calibration:
    """Fit the per-group curves on raw scores of held-out normal pixels.

    Parameters
    ----------
    scores : ndarray (n,)
        Raw pixel scores of normal pixels not used to fit the dictionary (finite).
    labels : ndarray of int (n,)
        Nearest centroid of each, in ``[0, n_labels)``.
    distance_class : ndarray of int (n,)
        Distance class of each (see :func:`distance_classes`), in ``[0, m]``.
    n_labels : int
        Number of centroids.
    distance_edges : ndarray (m,)
        Boundaries of the distance classes, pixels.
    grouping : {"centroid", "distance", "global"}
        Finest grouping tried (see :data:`GROUPINGS`).
    min_samples : int
        Fewest calibration pixels a group needs; smaller ones fall back to the coarser group.
    tail : int, optional
        Samples in each group's fitted tail (at most a tenth of the group's);
        default ``max(30, n / 1000)``. Choose it so the tail holds enough
        *independent* samples: neighbouring pixel scores are strongly correlated.
    n_knots : int
        Knots of each group's empirical curve.

    Returns
    -------
    Calibration
    """
    if grouping not in GROUPINGS:
        raise ParameterError(f"calibration_groups={grouping!r} is invalid; choose from {list(GROUPINGS)}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=np.int64).ravel()
    classes = np.asarray(distance_class, dtype=np.int64).ravel()
    keep = np.isfinite(scores)
    scores, labels, classes = scores[keep], labels[keep], classes[keep]
    if len(scores) < 2:
        raise ParameterError(
            "calibration got fewer than 2 valid validation pixels; give larger or more validation images"
        )
    m = len(distance_edges)
    curves: list[tuple[np.ndarray, np.ndarray, float, float, int]] = []
    parents: list[int] = []

    def add(sel: np.ndarray, parent: int) -> int:
        x = np.sort(scores[sel])
        n_tail = tail if tail is not None else max(30, len(x) // 1000)
        curves.append((*_curve(x, n_knots, n_tail), len(x)))
        parents.append(parent)
        return len(curves) - 1

    pooled = add(np.ones(len(scores), dtype=bool), -1)
    table = np.full((m + 1, max(1, n_labels)), pooled, dtype=np.int64)
    if grouping != "global":
        for d in range(m + 1):
            in_class = classes == d
            if in_class.sum() < min_samples:
                continue
            cls = add(in_class, -1)  # distance classes stand alone
            table[d, :] = cls
            if grouping != "centroid":
                continue
            counts = np.bincount(labels[in_class], minlength=n_labels)
            for c in np.flatnonzero(counts >= min_samples):
                table[d, c] = add(in_class & (labels == c), cls)
    # one rectangular array: extend shorter curves along their own tail
    width = max(2, max(len(c[0]) for c in curves))
    knots = np.empty((len(curves), width))
    values = np.empty((len(curves), width))
    for i, (k, v, shape, scale, _) in enumerate(curves):
        extra = width - len(k)
        step = max(1e-9, 1e-6 * abs(float(k[-1])))
        pad = step * np.arange(1, extra + 1)
        knots[i] = np.r_[k, k[-1] + pad]
        values[i] = np.r_[v, v[-1] + _tail_value(pad, np.full(extra, shape), np.full(extra, scale))]
    return Calibration(
        distance_edges=np.asarray(distance_edges, dtype=np.float32),
        table=table,
        knots=knots,
        values=values,
        tail_shape=np.array([c[2] for c in curves]),
        tail_scale=np.array([c[3] for c in curves]),
        counts=np.array([c[4] for c in curves], dtype=np.float64),
        parents=np.array(parents, dtype=np.int64),
    )
