"""Evaluation report: metrics as JSON and pictures as PNG, written through fsspec.

The pictures are drawn with matplotlib's Agg canvas on figures that are not registered with
pyplot, so writing reports from several threads does not share any global figure state.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from scipy import ndimage

from .errors import ParameterError
from .evaluation import MetricsAccumulator
from .metrics import aupro_from_curve, pro_curve, roc_curve_from_hist
from .outputs import overlay_image

__all__ = ["gt_overlay", "write_report"]

#: Colours of the overlay: predicted mask (blended) and ground-truth contours.
MASK_RGB = (255, 0, 0)
CONTOUR_RGB = (0, 255, 0)
MASK_OPACITY = 0.45

#: Most bins drawn in the score histogram; finer histograms are summed into this many.
HISTOGRAM_BINS = 256


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists, NaN into None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name, then move it in place."""
    tmp = path + ".partial"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def _figure_png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib figure drawn with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _new_figure(title: str) -> tuple[Any, Any]:
    """A figure (not known to pyplot) with one axes and a title."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _fmt(value: Any) -> str:
    """A metric for a plot title: three decimals, or ``n/a`` when undefined."""
    return "n/a" if value is None else f"{value:.3f}"


def _roc_png(hist: dict[str, Any], metrics: dict[str, Any]) -> bytes:
    """ROC curve picture."""
    fpr, tpr = roc_curve_from_hist(hist["normal"], hist["anomalous"])
    fig, ax = _new_figure(f"Pixel ROC, AUROC = {_fmt(metrics.get('auroc'))}")
    ax.plot(fpr, tpr, color="C0", lw=1.5, label="score map")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="chance")
    if metrics.get("normal_marked") is not None and metrics.get("recall") is not None:
        ax.plot([metrics["normal_marked"]], [metrics["recall"]], "o", color="C3",
                label=f"threshold {metrics.get('threshold', hist['threshold']):g}")
    ax.set_xlabel("false positive rate (normal pixels marked)")
    ax.set_ylabel("true positive rate (anomalous pixels marked)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    return _figure_png(fig)


def _pro_png(hist: dict[str, Any], metrics: dict[str, Any]) -> bytes:
    """PRO curve picture, the integrated part shaded."""
    max_fpr = float(hist.get("max_fpr", metrics.get("max_fpr", 0.3)))
    fpr, pro = pro_curve(hist["normal"], hist["pro"], int(hist["regions"]))
    aupro = metrics.get("aupro", aupro_from_curve(fpr, pro, max_fpr))
    fig, ax = _new_figure(f"Per-region overlap, AUPRO@{max_fpr:g} = {_fmt(aupro)}")
    ax.plot(fpr, pro, color="C0", lw=1.5)
    inside = fpr <= max_fpr
    ax.fill_between(fpr[inside], pro[inside], color="C0", alpha=0.15)
    ax.axvline(max_fpr, color="0.4", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate (normal pixels marked)")
    ax.set_ylabel(f"mean overlap of {int(hist['regions'])} ground-truth regions")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    return _figure_png(fig)


def _coarse(edges: np.ndarray, counts: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum neighbouring bins so that at most ``most`` remain; returns edges and counts."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size <= most:
        return np.asarray(edges), counts
    starts = np.linspace(0, counts.size, most + 1).astype(int)[:-1]
    starts = np.unique(starts)
    return np.append(np.asarray(edges)[starts], edges[-1]), np.add.reduceat(counts, starts)


def _histogram_png(hist: dict[str, Any]) -> bytes:
    """Score histograms of normal and anomalous pixels, log counts."""
    fig, ax = _new_figure("Pixel scores")
    edges = np.asarray(hist["edges"], dtype=np.float64)
    for key, colour, label in (("normal", "C0", "normal"), ("anomalous", "C3", "anomalous")):
        e, c = _coarse(edges, hist[key], HISTOGRAM_BINS)
        total = int(np.sum(c))
        if total:
            ax.stairs(c, e, color=colour, lw=1.2, label=f"{label} ({total} px)")
    ax.axvline(float(hist["threshold"]), color="k", lw=0.8, ls="--", label=f"threshold {hist['threshold']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("score")
    ax.set_ylabel("pixels per bin")
    ax.legend(loc="upper right")
    return _figure_png(fig)


def gt_overlay(rgb: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An image with the predicted mask blended in red and the ground-truth contours in green.

    Parameters
    ----------
    rgb : numpy.ndarray
        uint8 ``(H, W, 3)`` image, or ``(H, W)`` grey.
    gt : numpy.ndarray
        Bool ``(H, W)`` ground truth; its contour is ``gt & ~binary_erosion(gt)``.
    mask : numpy.ndarray
        Bool ``(H, W)`` predicted mask.

    Returns
    -------
    numpy.ndarray
        uint8 ``(H, W, 3)``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ParameterError(f"overlay image must be (H, W, 3) RGB or (H, W) grey; got shape {rgb.shape}")
    gt = np.asarray(gt, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if gt.shape != rgb.shape[:2] or mask.shape != rgb.shape[:2]:
        raise ParameterError(
            f"overlay image {rgb.shape[:2]}, ground truth {gt.shape} and mask {mask.shape} must have "
            "the same height and width"
        )
    contour = gt & ~ndimage.binary_erosion(gt, border_value=0)
    out = overlay_image(rgb.astype(np.uint8), mask, MASK_RGB, MASK_OPACITY)
    return overlay_image(out, contour, CONTOUR_RGB, 1.0)


def _safe_name(name: str) -> str:
    """A file-name stem from an image name: path separators and odd characters become ``_``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return stem or "image"


def write_report(
    acc_result_or_accumulator: MetricsAccumulator | dict[str, Any],
    output_dir: str,
    overlays: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write an evaluation report: metrics, ROC, PRO and histogram pictures, overlays.

    Parameters
    ----------
    acc_result_or_accumulator : MetricsAccumulator or dict
        An accumulator, or a dictionary from :meth:`MetricsAccumulator.result`. The curves
        and the histogram need the histograms: a dictionary must carry them under the key
        ``"histograms"`` (as from :meth:`MetricsAccumulator.histograms`; lists are fine),
        otherwise only ``metrics.json`` and the overlays are written, with a warning.
    output_dir : str
        Local folder or fsspec URL; created if missing. Existing files are replaced.
    overlays : list of tuple, optional
        ``(name, rgb, gt, mask)`` per picture: uint8 RGB ``(H, W, 3)``, bool ground truth and
        bool predicted mask of the same size. Written as ``<name>_gt_overlay.png``: the mask
        blended in red, the ground-truth contours in green.
    storage_options : dict, optional
        fsspec options for ``output_dir``.

    Returns
    -------
    dict of str to str
        Path (or URL) of each file written, keyed ``metrics``, ``roc``, ``pro``,
        ``histogram`` and ``overlay:<name>``.
    """
    if isinstance(acc_result_or_accumulator, MetricsAccumulator):
        metrics = acc_result_or_accumulator.result()
        hist: dict[str, Any] | None = acc_result_or_accumulator.histograms()
    elif isinstance(acc_result_or_accumulator, dict):
        metrics = {k: v for k, v in acc_result_or_accumulator.items() if k != "histograms"}
        hist = acc_result_or_accumulator.get("histograms")
    else:
        raise ParameterError(
            "write_report needs a MetricsAccumulator or the dict of its result(); got "
            f"{type(acc_result_or_accumulator).__name__}"
        )
    if hist is not None:
        hist = {k: (np.asarray(v) if isinstance(v, (list, np.ndarray)) else v) for k, v in hist.items()}
    opts = storage_options or {}
    fs, root = fsspec.core.url_to_fs(str(output_dir), **opts)
    fs.makedirs(root, exist_ok=True)
    base = str(output_dir).rstrip("/")
    written: dict[str, str] = {}

    def put(key: str, filename: str, data: bytes) -> None:
        _write_bytes(fs, root.rstrip("/") + "/" + filename, data)
        written[key] = base + "/" + filename

    text = json.dumps(_jsonable(metrics), indent=2, allow_nan=False, sort_keys=False)
    put("metrics", "metrics.json", (text + "\n").encode())
    if hist is None:
        warnings.warn(
            "no histograms in the metrics dict, so roc.png, pro.png and histogram.png are not "
            "written; pass the MetricsAccumulator, or add result['histograms'] = acc.histograms()",
            UserWarning,
            stacklevel=2,
        )
    else:
        put("roc", "roc.png", _roc_png(hist, metrics))
        put("pro", "pro.png", _pro_png(hist, metrics))
        put("histogram", "histogram.png", _histogram_png(hist))
    for name, rgb, gt, mask in overlays or []:
        filename = f"{_safe_name(name)}_gt_overlay.png"
        buf = io.BytesIO()
        Image.fromarray(gt_overlay(rgb, gt, mask)).save(buf, format="PNG")
        put(f"overlay:{name}", filename, buf.getvalue())
    return written
