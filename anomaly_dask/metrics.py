"""Pixel metrics of anomaly score maps from fixed histograms: ROC, AUROC, PRO, AUPRO, F1.

Also the reading of ground truth (binary masks in any of the usual encodings). Pure numpy;
:class:`~anomaly_dask.evaluation.MetricsAccumulator` fills the histograms block by block.
"""

from __future__ import annotations

import numpy as np

from .errors import GroundTruthError

__all__ = [
    "aupro_from_curve",
    "binary_ground_truth",
    "auroc_from_hist",
    "best_f1_from_hist",
    "pro_curve",
    "read_ground_truth",
    "roc_curve_from_hist",
]


# ----------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------


def binary_ground_truth(array: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Validate a ground-truth array; return it as bool and its positive value (None: none)."""
    gt = np.asarray(array)
    if gt.ndim == 3 and gt.shape[2] == 1:
        gt = gt[:, :, 0]
    if gt.ndim != 2:
        hint = " (convert a colour mask to one band first)" if gt.ndim == 3 else ""
        raise GroundTruthError(f"ground truth must be a 2-D array (H, W); got shape {gt.shape}{hint}")
    if gt.dtype == bool:
        return gt, (1.0 if gt.any() else None)
    if not (np.issubdtype(gt.dtype, np.integer) or np.issubdtype(gt.dtype, np.floating)):
        raise GroundTruthError(f"ground truth must hold numbers or booleans; got dtype {gt.dtype}")
    positive = gt != 0
    values = gt[positive]
    if values.size == 0:
        return positive, None
    first = values.flat[0]
    if not (first > 0) or bool(np.any(values != first)):
        found = np.unique(gt)
        shown = ", ".join(str(v) for v in found[:8].tolist()) + (", ..." if found.size > 8 else "")
        raise GroundTruthError(
            f"ground truth is not binary: found {found.size} distinct values ({shown}); expected 0 "
            "for normal pixels and one positive value (1 or 255, say) for anomalous pixels. "
            "Threshold or re-export the mask so that it holds only two values."
        )
    return positive, float(first)


def read_ground_truth(array: np.ndarray) -> np.ndarray:
    """Check that an array is a binary ground-truth mask and return it as bool.

    Parameters
    ----------
    array : numpy.ndarray
        ``(H, W)`` or ``(H, W, 1)``: bool, or numbers that are 0 for normal pixels and one
        single positive value (1, 255, ...) for anomalous pixels.

    Returns
    -------
    numpy.ndarray
        Bool ``(H, W)``, True where anomalous.

    Raises
    ------
    GroundTruthError
        The array is not 2-D, not numeric, or holds other values than 0 and one positive
        value; the message lists the values found.
    """
    return binary_ground_truth(array)[0]


# ----------------------------------------------------------------------------------------
# Curves from histograms
# ----------------------------------------------------------------------------------------


def _tail_sums(hist: np.ndarray) -> np.ndarray:
    """``out[k] = hist[k:].sum()`` for ``k = 0 .. bins`` (so ``out[bins] = 0``)."""
    out = np.zeros(hist.size + 1, dtype=np.float64)
    out[:-1] = np.cumsum(hist[::-1], dtype=np.float64)[::-1]
    return out


def roc_curve_from_hist(normal_hist: np.ndarray, anomalous_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve with one point per bin edge, from score histograms.

    The point of edge ``k`` counts the pixels in bins ``k`` and above as marked, that is the
    pixels whose score is at least the edge.

    Parameters
    ----------
    normal_hist, anomalous_hist : numpy.ndarray
        Counts per score bin of normal and of anomalous pixels, same length ``bins``.

    Returns
    -------
    fpr, tpr : numpy.ndarray
        ``bins + 1`` points each, from ``(0, 0)`` (highest edge) to ``(1, 1)`` (lowest edge),
        with false positive rate non-decreasing. Rates are NaN when a class is empty.
    """
    n_tail = _tail_sums(np.asarray(normal_hist))[::-1]
    a_tail = _tail_sums(np.asarray(anomalous_hist))[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return n_tail / n_tail[-1], a_tail / a_tail[-1]


def auroc_from_hist(normal_hist: np.ndarray, anomalous_hist: np.ndarray) -> float | None:
    """Area under the ROC curve from score histograms.

    Equal to the trapezoid area under :func:`roc_curve_from_hist`: an anomalous pixel counts
    one against every normal pixel in a lower bin and one half against every normal pixel in
    its own bin.

    Parameters
    ----------
    normal_hist, anomalous_hist : numpy.ndarray
        Counts per score bin of normal and of anomalous pixels.

    Returns
    -------
    float or None
        The AUROC in ``[0, 1]``; None when either class has no pixel.
    """
    n = np.asarray(normal_hist, dtype=np.float64)
    a = np.asarray(anomalous_hist, dtype=np.float64)
    n_total, a_total = n.sum(), a.sum()
    if n_total == 0 or a_total == 0:
        return None
    below = np.cumsum(n) - n
    return float(np.dot(a, below + 0.5 * n) / (n_total * a_total))


def pro_curve(
    normal_hist: np.ndarray, pro_hist: np.ndarray, n_regions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap against false positive rate, one point per bin edge.

    Parameters
    ----------
    normal_hist : numpy.ndarray
        Counts per score bin of normal pixels.
    pro_hist : numpy.ndarray
        Per bin, the sum over ground-truth regions of the fraction of the region's pixels
        that fall in the bin (as kept by :class:`MetricsAccumulator`).
    n_regions : int
        Number of ground-truth regions summed in ``pro_hist``.

    Returns
    -------
    fpr, pro : numpy.ndarray
        ``bins + 1`` points each, from the highest edge to the lowest, false positive rate
        non-decreasing. NaN where undefined (no normal pixel, no region).
    """
    n_tail = _tail_sums(np.asarray(normal_hist))[::-1]
    p_tail = _tail_sums(np.asarray(pro_hist, dtype=np.float64))[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = n_tail / n_tail[-1]
        pro = np.minimum(p_tail / n_regions, 1.0) if n_regions > 0 else np.full_like(p_tail, np.nan)
    return fpr, pro


def aupro_from_curve(fpr: np.ndarray, pro: np.ndarray, max_fpr: float = 0.3) -> float | None:
    """Normalised area under a PRO curve up to a false positive rate.

    The curve is integrated with the trapezoid rule from FPR 0 to ``max_fpr``, the PRO at
    ``max_fpr`` itself being interpolated linearly between its neighbouring points, and the
    area is divided by ``max_fpr``: a perfect score map gives 1, an inverted one 0.

    Parameters
    ----------
    fpr, pro : numpy.ndarray
        Curve points in order of non-decreasing FPR, as from :func:`pro_curve`.
    max_fpr : float
        Upper integration limit, in ``(0, 1]``.

    Returns
    -------
    float or None
        The normalised area; None when the curve is undefined.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    pro = np.asarray(pro, dtype=np.float64)
    if fpr.size == 0 or not (np.all(np.isfinite(fpr)) and np.all(np.isfinite(pro))):
        return None
    beyond = np.flatnonzero(fpr > max_fpr)
    if beyond.size:
        i = int(beyond[0])
        x = fpr[:i]
        y = pro[:i]
        if i == 0:
            x, y, end = np.array([0.0]), np.array([pro[0]]), pro[0]
        else:
            x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
            end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        x = np.append(x, max_fpr)
        y = np.append(y, end)
    else:
        x, y = fpr, pro
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))
    return area / max_fpr


def best_f1_from_hist(
    normal_hist: np.ndarray, anomalous_hist: np.ndarray, edges: np.ndarray
) -> tuple[float | None, float | None]:
    """Best F1 score over thresholds at the bin edges.

    Parameters
    ----------
    normal_hist, anomalous_hist : numpy.ndarray
        Counts per score bin of normal and of anomalous pixels, length ``bins``.
    edges : numpy.ndarray
        The ``bins + 1`` bin edges; a threshold at ``edges[k]`` marks bins ``k`` and above.

    Returns
    -------
    best_f1, best_threshold : float or None
        The highest F1 and the lowest edge reaching it; None when there is no anomalous pixel.
    """
    tp = _tail_sums(np.asarray(anomalous_hist))[:-1]
    fp = _tail_sums(np.asarray(normal_hist))[:-1]
    a_total = tp[0] if tp.size else 0.0
    if a_total == 0:
        return None, None
    f1 = 2.0 * tp / (tp + fp + a_total)  # 2tp / (2tp + fp + fn) with fn = A - tp
    k = int(np.argmax(f1))
    return float(f1[k]), float(edges[k])
