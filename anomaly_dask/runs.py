"""Runs of a fitted detector over ordinary images: ``test`` (mask and overlay PNGs) and
``evaluate`` against ground truth (chunk by chunk, memory flat).

:class:`~anomaly_dask.detector.AnomalyDetector` delegates its :meth:`test` and
:meth:`evaluate` here (``detect`` to :mod:`anomaly_dask.detection`); scheduling stays in
:mod:`anomaly_dask.compute`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from . import compute
from .contact_files import write_contacts
from .contacts import find_contacts
from .errors import GroundTruthError
from .intensity import to_unit_rgb
from .io import ImageSource, list_images, open_source, output_names
from .outputs import check_writable, display_rgb, mask_image, overlay_image, write_png
from .scoring import plan_units

if TYPE_CHECKING:
    from .detector import AnomalyDetector

__all__ = ["evaluate_images", "pair_ground_truth", "test_images"]

log = logging.getLogger("anomaly_dask")


def pair_ground_truth(det: AnomalyDetector, test: Any, ground_truth: Any, s: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(test image, ground-truth image) pairs: by position for arrays, by file stem
    (``<stem>``, ``<stem>_mask`` or ``<stem>_gt``) for folders."""
    images = det._collect(test, s)
    if isinstance(ground_truth, (np.ndarray, list, tuple)):
        truths = det._collect(ground_truth, s)
        if len(truths) != len(images):
            raise GroundTruthError(
                f"{len(images)} test image(s) but {len(truths)} ground-truth image(s); give one per test image"
            )
        return list(zip(images, truths))
    truths = list_images(ground_truth, s["storage_options"])
    if len(images) == 1 and len(truths) == 1:
        return [(images[0], truths[0])]
    by_stem: dict[str, str] = {}
    for t in truths:
        stem = os.path.splitext(os.path.basename(str(t)))[0]
        for suffix in ("_mask", "_gt"):
            if stem.endswith(suffix):
                by_stem.setdefault(stem[: -len(suffix)], t)
        by_stem[stem] = t
    pairs, missing = [], []
    for im in images:
        stem = os.path.splitext(os.path.basename(str(im)))[0]
        if stem in by_stem:
            pairs.append((im, by_stem[stem]))
        else:
            missing.append(str(im))
    if missing:
        raise GroundTruthError(
            f"no ground truth in {ground_truth} for {len(missing)} test image(s), e.g. {missing[0]}: "
            f"name each mask <stem>.png (or <stem>_mask.*, <stem>_gt.*) after its test image"
        )
    return pairs


def evaluate_images(
    det: AnomalyDetector,
    test: Any,
    ground_truth: Any,
    output: str | None = None,
    *,
    overlays: bool = True,
) -> dict[str, Any]:
    """Body of :meth:`AnomalyDetector.evaluate <anomaly_dask.detector.AnomalyDetector.evaluate>`."""
    from .evaluation import MetricsAccumulator
    from .metrics import read_ground_truth
    from .report import write_report

    det._check_fitted()
    s = det._settings()
    pairs = det._pair_ground_truth(test, ground_truth, s)
    chunk = s["chunk_size"]
    opened = []
    any_anomalous = False
    for image, truth in pairs:
        source, grid = det._open(image, s)
        gt_source = open_source(truth, s["storage_options"])
        if (gt_source.height, gt_source.width) != (source.height, source.width):
            raise GroundTruthError(
                f"ground truth {gt_source.name} is {gt_source.height}x{gt_source.width} px but its "
                f"test image {source.name} is {source.height}x{source.width}; give a mask of the image's size"
            )
        units = plan_units(source, grid, chunk)
        for u in units:  # masks are cheap to read: check them all before scoring
            w = u.window
            block = _gt_block(gt_source, w, read_ground_truth)
            any_anomalous = any_anomalous or bool(block.any())
        opened.append((source, gt_source, units))
    if not any_anomalous:
        raise GroundTruthError(
            "the ground truth marks no anomalous pixel in any test image; AUROC and AUPRO need "
            "some (masks use 0 for normal and one positive value, e.g. 255, for anomalous)"
        )
    pixel_area = None
    georef = getattr(opened[0][0], "georef", None) if len(opened) == 1 else None
    if georef and georef.get("transform"):
        t = georef["transform"]
        pixel_area = abs(t[1] * t[5] - t[2] * t[4]) or None
    acc = MetricsAccumulator(det.threshold_, lo=0.0, hi=20.0, bins=8192, pixel_area_m2=pixel_area)
    pictures = []
    with compute.session(s["client"], det._extractor(s), det.dictionary_) as job:
        for source, gt_source, units in opened:
            name = os.path.splitext(os.path.basename(source.name))[0] or source.name
            step = max(1, -(-max(source.height, source.width) // 2048))
            small = (
                [np.zeros((-(-source.height // step), -(-source.width // step), 3), np.uint8),
                 np.zeros((-(-source.height // step), -(-source.width // step)), bool),
                 np.zeros((-(-source.height // step), -(-source.width // step)), bool)]
                if overlays and output is not None else None
            )
            for unit, scores in job.blocks(units, s["kmeans_neighbors"]):
                w = unit.window
                gt, near = _gt_block_with_margin(gt_source, w, read_ground_truth, acc.margin)
                acc.add(scores, gt, image=name, offset=(w.y0, w.x0), shape=(source.height, source.width), near=near)
                if small is not None:
                    at = (slice((-w.y0) % step, None, step), slice((-w.x0) % step, None, step))
                    ys, xs = -(-w.y0 // step), -(-w.x0 // step)
                    rgb = display_rgb(to_unit_rgb(source.read(w.y0, w.y1, w.x0, w.x1), det.intensity_))[at]
                    box = (slice(ys, ys + rgb.shape[0]), slice(xs, xs + rgb.shape[1]))
                    small[0][box] = rgb
                    small[1][box] = gt[at]
                    small[2][box] = np.nan_to_num(scores[at], nan=-np.inf) >= det.threshold_
            if small is not None:
                pictures.append((name, small[0], small[1], small[2]))
    result = acc.result()
    result["false_alarm_rate"] = det.false_alarm_rate_
    result["threshold"] = det.threshold_
    if output is not None:
        result["report"] = write_report(
            {**result, "histograms": acc.histograms()}, str(output), pictures or None, s["storage_options"]
        )
    log.info(
        "evaluated %d image(s): AUROC %.4f, AUPRO %s, F1 %.3f, normal pixels marked %.4f (promised %.3g)",
        len(opened), result["auroc"] or float("nan"), result["aupro"], result["f1"] or 0.0,
        result["normal_marked"] or 0.0, det.false_alarm_rate_,
    )
    return result


def _gt_block(gt_source: ImageSource, w: Any, check: Any) -> np.ndarray:
    """The ground-truth window ``w`` as bool (a colour mask counts where any band is set)."""
    block = np.asarray(gt_source.read(w.y0, w.y1, w.x0, w.x1))
    if block.ndim == 3:
        block = block.max(axis=-1)
    try:
        return check(block)
    except GroundTruthError as err:
        raise GroundTruthError(f"{gt_source.name}: {err}") from None


def _gt_block_with_margin(gt_source: ImageSource, w: Any, check: Any, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of window ``w`` and its pixels within ``margin`` of an anomalous pixel,
    the latter from a window read ``margin`` wider (so it does not depend on the chunking)."""
    from types import SimpleNamespace

    from .regions import near_anomalies

    y0, x0 = max(0, w.y0 - margin), max(0, w.x0 - margin)
    y1, x1 = min(gt_source.height, w.y1 + margin), min(gt_source.width, w.x1 + margin)
    wide = _gt_block(gt_source, SimpleNamespace(y0=y0, y1=y1, x0=x0, x1=x1), check)
    crop = (slice(w.y0 - y0, w.y1 - y0), slice(w.x0 - x0, w.x1 - x0))
    return wide[crop], near_anomalies(wide, margin)[crop]


def test_images(det: AnomalyDetector, test: Any, output_dir: str) -> list[dict[str, Any]]:
    """Body of :meth:`AnomalyDetector.test <anomaly_dask.detector.AnomalyDetector.test>`."""
    det._check_fitted()
    s = det._settings()
    files = list_images(test, s["storage_options"])
    stems = output_names(test, files, s["storage_options"])  # refuses clashes up front
    opened = [(f, *det._open(f, s)) for f in files]  # fail on a bad file before writing
    fs, out_path = fsspec.core.url_to_fs(str(output_dir), **(s["storage_options"] or {}))
    check_writable(fs, out_path, str(output_dir))
    for stem in stems:
        if "/" in stem:
            fs.makedirs(f"{out_path.rstrip('/')}/{stem.rsplit('/', 1)[0]}", exist_ok=True)
    sep = "" if str(output_dir).endswith("/") else "/"
    results = []
    with compute.session(s["client"], det._extractor(s), det.dictionary_) as job:
        for (f, source, grid), stem in zip(opened, stems):
            t0 = time.perf_counter()
            scores = job.score(source, grid, s["chunk_size"], s["kmeans_neighbors"])
            mask = mask_image(scores, det.threshold_)
            rgb = display_rgb(to_unit_rgb(source.read(0, source.height, 0, source.width), det.intensity_))
            overlay = overlay_image(rgb, mask, s["overlay_color"], s["overlay_opacity"])
            mask_path = f"{output_dir}{sep}{stem}_mask.png"
            overlay_path = f"{output_dir}{sep}{stem}_overlay.png"
            write_png(mask_path, mask, s["storage_options"])
            write_png(overlay_path, overlay, s["storage_options"])
            found = find_contacts([(0, 0, scores)], source.height, source.width, det.threshold_, image=str(f))
            contacts_path = write_contacts(
                found, f"{output_dir}{sep}{stem}", formats=("csv",), storage_options=s["storage_options"]
            )["csv"]
            n_bad = int((mask > 0).sum())
            results.append({
                "path": str(f), "height": source.height, "width": source.width,
                "anomalous_pixels": n_bad, "anomalous_fraction": n_bad / mask.size,
                "max_score": float(np.nanmax(scores)), "mask_path": mask_path,
                "overlay_path": overlay_path, "contacts": len(found), "contacts_path": contacts_path,
            })
            log.info(
                "%s: %d anomalous pixels (%.2f%%), max score %.3f, %.1f s",
                f, n_bad, 100 * n_bad / mask.size, scores.max(), time.perf_counter() - t0,
            )
    return results
