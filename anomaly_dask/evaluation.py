"""Pixel and region metrics of anomaly score maps, accumulated in bounded memory.

Score maps are float arrays ``(H, W)`` in which a higher value means more anomalous and NaN
means no data; NaN pixels are left out of every count. Ground truth is a binary array of the
same shape. A large raster may be fed block by block, in any order, each block with its
origin in the image: all pixel statistics go into fixed histograms over ``[lo, hi]`` (scores
outside are clipped into the end bins), so memory does not grow with the number of pixels.

Regions are 8-connected components, both of the ground truth (for the per-region overlap,
PRO, and for counting regions found or missed) and of the predicted mask ``score >=
threshold`` (for counting false regions). Each block is labelled on its own; the labels of
its edge rows and columns are kept and, once an image is complete, joined across block
borders (a union-find over the ``(block, label)`` pieces, solved as connected components of
a sparse graph). Each ground-truth piece keeps a sparse histogram of its scores so that the
PRO curve can be formed once the full size of its region is known.

All numbers are computed on the host with numpy and scipy; nothing here reads or writes
files.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import GroundTruthError, ParameterError
from .metrics import (
    aupro_from_curve,
    auroc_from_hist,
    best_f1_from_hist,
    binary_ground_truth,
    pro_curve,
)
from .regions import EIGHT, ImageState, RegionTotals, near_mask

__all__ = ["MetricsAccumulator", "image_metrics"]


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    """A metrics dictionary without its private (underscore) entries."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def _ratio(num: float, den: float) -> float | None:
    """``num / den`` as float, None when ``den`` is 0."""
    return float(num / den) if den else None


class MetricsAccumulator:
    """Pixel and region metrics of score maps, fed one image or one block at a time.

    Parameters
    ----------
    threshold : float
        The model's decision threshold: a pixel is marked anomalous when ``score >=
        threshold``. F1, precision, recall, ``normal_marked`` and the region counts use it.
    lo, hi : float
        Score range of the histograms; scores outside are clipped into the end bins. Choose
        it to cover the scores of interest: curves lose resolution outside it.
    bins : int
        Number of histogram bins over ``[lo, hi]``.
    max_fpr : float
        False positive rate up to which the PRO curve is integrated, in ``(0, 1]``.
    pixel_area_m2 : float, optional
        Ground area of one pixel in square metres; when given, false regions are also
        reported per square kilometre of valid pixels.
    margin : int
        Normal pixels within this many pixels of an anomalous one are left out of
        ``normal_marked_far``: a pixel score averages the tiles covering it, so pixels
        beside an anomaly share its tiles (default 32, one tile).

    Notes
    -----
    Memory: four ``bins``-long histograms overall, plus, for each image whose blocks have
    not all arrived yet, two histograms, the labels of the blocks' edge rows and columns and
    a sparse histogram per ground-truth piece. An image is finished (and its per-block data
    dropped) as soon as its blocks cover its whole area. Blocks of one image must not
    overlap.

    Examples
    --------
    >>> acc = MetricsAccumulator(threshold=3.0)
    >>> acc.add(scores, gt, image="tile_07")                    # doctest: +SKIP
    >>> acc.add(block, gt_block, image="mosaic", offset=(0, 4096), shape=(20000, 30000))
    ...                                                         # doctest: +SKIP
    >>> metrics = acc.result()                                  # doctest: +SKIP
    """

    def __init__(
        self,
        threshold: float,
        lo: float = 0.0,
        hi: float = 20.0,
        bins: int = 8192,
        max_fpr: float = 0.3,
        pixel_area_m2: float | None = None,
        margin: int = 32,
    ) -> None:
        if not math.isfinite(float(threshold)):
            raise ParameterError(f"threshold must be a finite number; got {threshold!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ParameterError(f"lo and hi must be finite with lo < hi; got lo={lo!r}, hi={hi!r}")
        if int(bins) != bins or bins < 2:
            raise ParameterError(f"bins must be an integer >= 2; got {bins!r}")
        if not (0.0 < max_fpr <= 1.0):
            raise ParameterError(f"max_fpr must be in (0, 1]; got {max_fpr!r}")
        if pixel_area_m2 is not None and not (math.isfinite(pixel_area_m2) and pixel_area_m2 > 0):
            raise ParameterError(f"pixel_area_m2 must be a positive number or None; got {pixel_area_m2!r}")
        self.threshold = float(threshold)
        self.lo = float(lo)
        self.hi = float(hi)
        self.bins = int(bins)
        self.max_fpr = float(max_fpr)
        self.pixel_area_m2 = None if pixel_area_m2 is None else float(pixel_area_m2)
        self.margin = int(margin)
        #: Bin edges, ``bins + 1`` values from ``lo`` to ``hi``.
        self.edges = np.linspace(self.lo, self.hi, self.bins + 1)
        #: Counts per bin of normal and of anomalous valid pixels, over all images.
        self.normal_hist = np.zeros(self.bins, dtype=np.int64)
        self.anomalous_hist = np.zeros(self.bins, dtype=np.int64)
        self._clipped_low = 0
        self._clipped_high = 0
        self._finished = RegionTotals(np.zeros(self.bins, dtype=np.float64))
        self._pending: dict[str, ImageState] = {}
        self._images: dict[str, dict[str, Any]] = {}

    # -- feeding -------------------------------------------------------------------------

    def _bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Bin of each score such that ``score >= edges[k]`` exactly when ``bin >= k``."""
        s = np.clip(scores, self.lo, self.hi)
        idx = ((s - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        idx -= s < self.edges[idx]
        up = (idx < self.bins - 1) & (s >= self.edges[np.minimum(idx + 1, self.bins)])
        idx += up
        return idx

    def add(
        self,
        scores: np.ndarray,
        gt: np.ndarray,
        image: str = "image",
        offset: tuple[int, int] = (0, 0),
        shape: tuple[int, int] | None = None,
        near: np.ndarray | None = None,
    ) -> None:
        """Add the scores of one image, or of one block of an image.

        Parameters
        ----------
        scores : numpy.ndarray
            Float ``(h, w)`` scores, NaN where there is no data.
        gt : numpy.ndarray
            Ground truth of the same pixels, ``(h, w)``: bool, or 0 and one positive value.
        image : str
            Name of the image the pixels belong to; per-image metrics are keyed by it.
        offset : tuple of int
            ``(y0, x0)``, origin of the block in the image; ``(0, 0)`` for a whole image.
        shape : tuple of int, optional
            ``(H, W)`` of the whole image when ``scores`` is a block of it; by default the
            block is the whole image. Every block of an image must give the same shape.
        near : numpy.ndarray of bool, optional
            Pixels within ``margin`` of an anomalous pixel (left out of
            ``normal_marked_far``). By default found from ``gt`` itself, which is exact for
            a whole image; for a block, pass it from a ground-truth window read ``margin``
            wider.

        Raises
        ------
        ParameterError
            Scores not 2-D, or a block that lies outside the image, overlaps a block already
            added, or disagrees with earlier blocks about the image shape.
        GroundTruthError
            Ground truth of another shape than the scores, or not binary.
        """
        scores = np.asarray(scores)
        if scores.ndim != 2:
            raise ParameterError(
                f"scores of {image!r} must be a 2-D array (H, W); got shape {scores.shape}. "
                "Pass one band of scores per image (squeeze or select the band first)."
            )
        if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
            raise ParameterError(f"scores of {image!r} must be numbers; got dtype {scores.dtype}")
        gt_bool, gt_value = binary_ground_truth(gt)
        if gt_bool.shape != scores.shape:
            raise GroundTruthError(
                f"ground truth of {image!r} has shape {gt_bool.shape} but its scores have shape "
                f"{scores.shape}; give the mask of exactly the same pixels (same size, not resized "
                "or cropped differently)."
            )
        h, w = scores.shape
        y0, x0 = (int(v) for v in offset)
        full = (h, w) if shape is None else (int(shape[0]), int(shape[1]))
        if shape is None and (y0, x0) != (0, 0):
            raise ParameterError(
                f"block of {image!r} at offset {(y0, x0)} needs the whole image shape: pass shape=(H, W)"
            )
        if y0 < 0 or x0 < 0 or y0 + h > full[0] or x0 + w > full[1]:
            raise ParameterError(
                f"block of {image!r} with shape {(h, w)} at offset {(y0, x0)} does not fit in the "
                f"image shape {full}"
            )
        if image in self._images:
            raise ParameterError(
                f"image {image!r} is already complete: its blocks covered all {full[0] * full[1]} "
                "pixels. Blocks must not overlap, and image names must be unique."
            )
        state = self._pending.get(image)
        if state is None:
            state = ImageState(
                shape=full,
                normal=np.zeros(self.bins, dtype=np.int64),
                anomalous=np.zeros(self.bins, dtype=np.int64),
            )
        elif state.shape != full:
            raise ParameterError(
                f"block of {image!r} gives image shape {full}, earlier blocks gave {state.shape}"
            )
        if (y0, x0) in state.offsets or state.covered + h * w > full[0] * full[1]:
            raise ParameterError(
                f"block of {image!r} at offset {(y0, x0)} overlaps blocks already added; each "
                "pixel of an image must be added once"
            )
        if gt_value is not None and state.gt_value is not None and gt_value != state.gt_value:
            raise GroundTruthError(
                f"ground truth of {image!r} marks anomalies with {state.gt_value:g} in one block "
                f"and {gt_value:g} in another; use one value throughout the mask"
            )
        self._pending[image] = state
        if near is None:
            near = near_mask(gt_bool, self.margin)
        elif np.shape(near) != gt_bool.shape:
            raise ParameterError(f"near of {image!r} has shape {np.shape(near)}, not {gt_bool.shape}")
        if h * w:
            self._add_block(state, scores, gt_bool, y0, x0, np.asarray(near, dtype=bool))
        state.offsets.add((y0, x0))
        state.covered += h * w
        if gt_value is not None:
            state.gt_value = gt_value
        if state.covered == full[0] * full[1]:
            metrics, totals = self._finish(state)
            self._images[image] = metrics
            self._finished.add(totals)
            del self._pending[image]

    def _add_block(
        self, state: ImageState, scores: np.ndarray, gt: np.ndarray, y0: int, x0: int, near: np.ndarray
    ) -> None:
        """Histogram a checked block and label its regions."""
        valid = ~np.isnan(scores) if np.issubdtype(scores.dtype, np.floating) else np.ones(scores.shape, bool)
        s = scores[valid]
        g = gt[valid]
        idx = self._bin_index(s)
        normal = np.bincount(idx[~g], minlength=self.bins)
        anomalous = np.bincount(idx[g], minlength=self.bins)
        state.normal += normal
        state.anomalous += anomalous
        self.normal_hist += normal
        self.anomalous_hist += anomalous
        self._clipped_low += int(np.count_nonzero(s < self.lo))
        self._clipped_high += int(np.count_nonzero(s > self.hi))
        marked = np.zeros(scores.shape, dtype=bool)
        marked[valid] = s >= self.threshold
        state.valid += int(s.size)
        state.n_anomalous += int(np.count_nonzero(g))
        state.marked += int(np.count_nonzero(marked))
        state.true_positive += int(np.count_nonzero(marked & gt))
        far = valid & ~gt & ~near
        state.far_normal += int(np.count_nonzero(far))
        state.far_marked += int(np.count_nonzero(far & marked))

        # Ground-truth pieces: valid size, hit flag, sparse score histogram.
        gt_lab, n_gt = ndimage.label(gt, structure=EIGHT)
        if n_gt:
            nodes = state.gt.add_block(gt_lab, n_gt, y0, x0)
            lab_valid = gt_lab[valid]
            state.gt.sizes.append(np.bincount(lab_valid, minlength=n_gt + 1)[1:])
            state.gt.flags.append(np.bincount(gt_lab[marked], minlength=n_gt + 1)[1:] > 0)
            in_gt = lab_valid > 0
            key = (lab_valid[in_gt] - 1) * self.bins + idx[in_gt]
            uniq, counts = np.unique(key, return_counts=True)
            state.gt.hist_node.append(nodes[uniq // self.bins + 1])
            state.gt.hist_bin.append(uniq % self.bins)
            state.gt.hist_count.append(counts)

        # Mask pieces: does each touch a ground-truth pixel?
        mask_lab, n_mask = ndimage.label(marked, structure=EIGHT)
        if n_mask:
            state.mask.add_block(mask_lab, n_mask, y0, x0)
            state.mask.flags.append(np.bincount(mask_lab[marked & gt], minlength=n_mask + 1)[1:] > 0)

    # -- results -------------------------------------------------------------------------

    def _finish(self, state: ImageState) -> tuple[dict[str, Any], RegionTotals]:
        """Per-image metrics and region totals of an image (pure: ``state`` is not changed)."""
        width = state.shape[1]
        totals = RegionTotals(np.zeros(self.bins, dtype=np.float64))
        if state.gt.n_nodes:
            roots, count = state.gt.roots(width)
            size = np.bincount(roots, np.concatenate(state.gt.sizes), minlength=count)
            hit = np.bincount(roots, np.concatenate(state.gt.flags), minlength=count) > 0
            present = size > 0
            node = np.concatenate(state.gt.hist_node)
            weight = np.concatenate(state.gt.hist_count) / size[roots[node]]
            totals.pro_hist = np.bincount(np.concatenate(state.gt.hist_bin), weight, minlength=self.bins)
            totals.regions = int(np.count_nonzero(present))
            totals.regions_hit = int(np.count_nonzero(hit & present))
        if state.mask.n_nodes:
            roots, count = state.mask.roots(width)
            touches = np.bincount(roots, np.concatenate(state.mask.flags), minlength=count) > 0
            totals.false_regions = int(np.count_nonzero(~touches))
        counts = dict(
            valid=state.valid,
            anomalous=state.n_anomalous,
            marked=state.marked,
            true_positive=state.true_positive,
            far_normal=state.far_normal,
            far_marked=state.far_marked,
        )
        metrics = self._metrics(state.normal, state.anomalous, counts, totals)
        metrics["shape"] = list(state.shape)
        metrics["_true_positive"] = state.true_positive
        metrics["_far_normal"] = state.far_normal
        metrics["_far_marked"] = state.far_marked
        return metrics, totals

    def _metrics(
        self, normal: np.ndarray, anomalous: np.ndarray, counts: dict[str, int], totals: RegionTotals
    ) -> dict[str, Any]:
        """The metrics dictionary from histograms, pixel counts and region totals."""
        valid, n_anom, marked, tp = (
            counts["valid"], counts["anomalous"], counts["marked"], counts["true_positive"],
        )
        n_normal = valid - n_anom
        fp, fn = marked - tp, n_anom - tp
        aupro = None
        if totals.regions and n_normal:
            fpr, pro = pro_curve(normal, totals.pro_hist, totals.regions)
            aupro = aupro_from_curve(fpr, pro, self.max_fpr)
        best_f1, best_threshold = best_f1_from_hist(normal, anomalous, self.edges)
        mpx = valid / 1e6
        per_km2 = None
        if self.pixel_area_m2 is not None and valid:
            per_km2 = totals.false_regions / (valid * self.pixel_area_m2 / 1e6)
        return {
            "auroc": auroc_from_hist(normal, anomalous),
            "aupro": aupro,
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "precision": _ratio(tp, marked),
            "recall": _ratio(tp, n_anom),
            "best_f1": best_f1,
            "best_threshold": best_threshold,
            "threshold": self.threshold,
            "normal_marked": _ratio(fp, n_normal),
            "normal_marked_far": _ratio(counts["far_marked"], counts["far_normal"]),
            "valid_pixels": int(valid),
            "anomalous_pixels": int(n_anom),
            "normal_pixels": int(n_normal),
            "marked_pixels": int(marked),
            "regions": totals.regions,
            "regions_hit": totals.regions_hit,
            "regions_missed": totals.regions - totals.regions_hit,
            "false_regions": totals.false_regions,
            "false_regions_per_mpx": _ratio(totals.false_regions, mpx),
            "false_regions_per_km2": per_km2,
        }

    def _all_totals(self) -> tuple[RegionTotals, dict[str, dict[str, Any]]]:
        """Region totals and per-image metrics including images whose blocks are incomplete."""
        totals = RegionTotals(self._finished.pro_hist.copy(), self._finished.regions,
                               self._finished.regions_hit, self._finished.false_regions)
        images = dict(self._images)
        for name, state in self._pending.items():
            metrics, part = self._finish(state)
            metrics["coverage"] = state.covered / (state.shape[0] * state.shape[1])
            images[name] = metrics
            totals.add(part)
        return totals, images

    @property
    def images(self) -> dict[str, dict[str, Any]]:
        """Metrics of each image whose blocks have all been added, by image name."""
        return {name: _public(m) for name, m in self._images.items()}

    def result(self) -> dict[str, Any]:
        """Metrics over everything added, plus the metrics of each image.

        Returns
        -------
        dict
            ``auroc``, ``aupro`` (normalised, up to ``max_fpr``), ``f1``, ``precision``,
            ``recall`` (at the threshold), ``best_f1``, ``best_threshold`` (over the bin
            edges), ``threshold``, ``normal_marked`` (share of normal pixels marked),
            ``normal_marked_far`` (the same, of normal pixels farther than ``margin`` from
            any anomalous one),
            ``valid_pixels``, ``anomalous_pixels``, ``normal_pixels``, ``marked_pixels``,
            ``regions``, ``regions_hit``, ``regions_missed``, ``false_regions`` (mask
            components with no ground-truth pixel), ``false_regions_per_mpx``,
            ``false_regions_per_km2`` (None without ``pixel_area_m2``), ``max_fpr``, ``lo``,
            ``hi``, ``bins``, ``clipped_low`` and ``clipped_high`` (valid scores outside
            ``[lo, hi]``), ``n_images`` and ``images``: name to the same per-image metrics
            (plus ``shape``; plus ``coverage`` for an image whose blocks did not all arrive).
            A metric that is undefined (a rate over an empty class) is None.

        Raises
        ------
        GroundTruthError
            No image was added, or the ground truth of all images holds no anomalous pixel.

        Warns
        -----
        UserWarning
            Some images are incomplete (their blocks do not cover them); their missing pixels
            are treated as no data.
        """
        if not self._images and not self._pending:
            raise GroundTruthError("no image was added to the metrics; call add() first")
        totals, images = self._all_totals()
        if self._pending:
            names = ", ".join(f"{k!r} ({100 * v['coverage']:.1f}%)" for k, v in images.items() if "coverage" in v)
            warnings.warn(
                f"images with blocks missing, counted as they are: {names}", UserWarning, stacklevel=2
            )
        counts = {k: 0 for k in ("valid", "anomalous", "marked", "true_positive", "far_normal", "far_marked")}
        for state in self._pending.values():
            counts["valid"] += state.valid
            counts["anomalous"] += state.n_anomalous
            counts["marked"] += state.marked
            counts["true_positive"] += state.true_positive
            counts["far_normal"] += state.far_normal
            counts["far_marked"] += state.far_marked
        for m in self._images.values():
            counts["valid"] += m["valid_pixels"]
            counts["anomalous"] += m["anomalous_pixels"]
            counts["marked"] += m["marked_pixels"]
            counts["true_positive"] += m["_true_positive"]
            counts["far_normal"] += m["_far_normal"]
            counts["far_marked"] += m["_far_marked"]
        if counts["anomalous"] == 0:
            raise GroundTruthError(
                f"the ground truth of all {len(images)} image(s) holds no anomalous pixel (among "
                f"{counts['valid']} valid pixels), so pixel AUROC, AUPRO and F1 are undefined. Check "
                "that the masks are the right files and not empty, and that anomalous pixels are "
                "not all no-data (NaN) in the scores."
            )
        out = self._metrics(self.normal_hist, self.anomalous_hist, counts, totals)
        out.update(
            max_fpr=self.max_fpr, lo=self.lo, hi=self.hi, bins=self.bins,
            clipped_low=self._clipped_low, clipped_high=self._clipped_high, n_images=len(images),
        )
        out["images"] = {name: _public(m) for name, m in images.items()}
        return out

    def histograms(self) -> dict[str, Any]:
        """The histograms behind the curves, for plots (see :mod:`anomaly_dask.report`).

        Returns
        -------
        dict
            ``edges`` (``bins + 1``), ``normal`` and ``anomalous`` (counts per bin), ``pro``
            (per bin, the summed region fractions of :func:`pro_curve`), ``regions``,
            ``threshold`` and ``max_fpr``; arrays are numpy arrays.
        """
        totals, _ = self._all_totals()
        return {
            "edges": self.edges.copy(),
            "normal": self.normal_hist.copy(),
            "anomalous": self.anomalous_hist.copy(),
            "pro": totals.pro_hist,
            "regions": totals.regions,
            "threshold": self.threshold,
            "max_fpr": self.max_fpr,
        }


def image_metrics(scores: np.ndarray, gt: np.ndarray, threshold: float, **kw: Any) -> dict[str, Any]:
    """Metrics of one whole image.

    Unlike :meth:`MetricsAccumulator.result`, an image without any anomalous pixel is not an
    error: the metrics that need one (AUROC, AUPRO, recall, F1) are None.

    Parameters
    ----------
    scores : numpy.ndarray
        Float ``(H, W)`` scores, NaN where there is no data.
    gt : numpy.ndarray
        Binary ground truth ``(H, W)``.
    threshold : float
        Decision threshold, ``score >= threshold`` is marked.
    **kw
        Further arguments of :class:`MetricsAccumulator` (``lo``, ``hi``, ``bins``,
        ``max_fpr``, ``pixel_area_m2``).

    Returns
    -------
    dict
        The per-image metrics of :meth:`MetricsAccumulator.result`.
    """
    acc = MetricsAccumulator(threshold, **kw)
    acc.add(scores, gt, image="image")
    return acc.images["image"]
