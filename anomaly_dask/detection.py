"""``detect``: score a huge image chunk by chunk into a resumable store, then export.

:meth:`AnomalyDetector.detect <anomaly_dask.detector.AnomalyDetector.detect>` delegates
here; scheduling stays in :mod:`anomaly_dask.compute`, the store in :mod:`anomaly_dask.store`.

A run has two identities. Its *run id* covers everything that shapes the scores (model,
parameters, chunk size, input content); its *rendering* the threshold and the overlay's
look. A store is resumed for the same run id: chunks without scores are scored, chunks
whose mask and overlay were drawn with another rendering are redrawn from the stored
scores, without the CNN, so changing the threshold costs a pass over the store only.

Exports are written beside the store, named after it (``out/a.zarr`` ->
``out/a_mask.tif``, ``out/a_quicklook.png``, ``out/a_contacts.geojson``, ...). The store
records which files it wrote; a file of that name that it did not write is never
replaced without ``overwrite``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from . import compute
from .config import saved_params
from .errors import OutputExistsError, ParameterError
from .identity import input_identity, jsonable, run_id_of
from .locations import beside, normalize_url, options_key
from .scoring import Rendering, Unit

if TYPE_CHECKING:
    from .detector import AnomalyDetector

__all__ = ["GEOTIFF_NAMES", "detect_image", "export_targets"]

log = logging.getLogger("anomaly_dask")

#: Parameters that choose the threshold only: they shape the rendering, not the scores.
THRESHOLD_RULES = ("threshold_mode", "false_alarm_rate", "cdf", "zscore", "threshold", "auto_threshold")

#: Arrays that can be exported as GeoTIFF.
GEOTIFF_NAMES = ("mask", "score", "overlay")


def export_targets(
    store_url: str, *, geotiff: tuple[str, ...], quicklook: bool, png_tiles: bool, contacts: tuple[str, ...],
    outlines: bool = False,
) -> dict[str, str]:
    """The exports a run writes beside the store at ``store_url``: what -> URL."""
    targets = {f"geotiff_{n}": beside(store_url, f"_{n}.tif") for n in geotiff}
    if quicklook:
        targets["quicklook"] = beside(store_url, "_quicklook.png")
    if png_tiles:
        targets["png_tiles"] = beside(store_url, "_tiles")
    for fmt in contacts:
        targets[f"contacts_{fmt}"] = beside(store_url, f"_contacts.{fmt}")
    if outlines and "geojson" in contacts:
        targets["outlines_geojson"] = beside(store_url, "_outlines.geojson")
    return targets


def _check_exports(
    targets: dict[str, str], old_attrs: dict[str, Any] | None, run_id: str, options: dict[str, Any] | None,
    overwrite: bool,
) -> None:
    """Refuse (before anything is written) to replace a file this store did not write."""
    ours = set()
    if old_attrs is not None and old_attrs.get("run_id") == run_id:
        ours = set((old_attrs.get("exports") or {}).values())
    elif old_attrs is not None and not overwrite:
        return  # the store of another run is refused first, saying what differs
    for url in targets.values():
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
        if url not in ours and not overwrite and fs.exists(path):
            raise OutputExistsError(
                f"{url} exists and was not written by this run of the store beside it; pass "
                "overwrite=True (--overwrite) to replace it, or choose another output"
            )


def _rendering(det: AnomalyDetector, s: dict[str, Any], run_id: str) -> tuple[Rendering, dict[str, Any]]:
    settings = jsonable({
        "threshold": float(det.threshold_), "false_alarm_rate": float(det.false_alarm_rate_),
        "overlay_color": list(s["overlay_color"]), "overlay_opacity": s["overlay_opacity"],
    })
    rid = run_id_of({"run_id": run_id, **settings})[:16]
    return Rendering(det.threshold_, s["overlay_color"], s["overlay_opacity"], s["kmeans_neighbors"], rid), settings


def _has_pyramid(store: Any) -> bool:
    attrs = store.attrs
    return "ome" in attrs or "multiscales" in attrs


def _statistics(store: Any) -> tuple[int, int, float]:
    """Valid and anomalous pixels and the largest score, chunk by chunk over the store."""
    mask_arr, score_arr = store.read("mask"), store.read("score")
    valid = anomalous = 0
    max_score = float("-inf")
    for iy, ix in store.all_chunks():
        y0, y1, x0, x1 = store.chunk_bounds(iy, ix)
        sc = np.asarray(score_arr[y0:y1, x0:x1])
        fin = np.isfinite(sc)
        valid += int(fin.sum())
        anomalous += int((np.asarray(mask_arr[y0:y1, x0:x1]) > 0).sum())
        if fin.any():
            max_score = max(max_score, float(sc[fin].max()))
    return valid, anomalous, max_score


def detect_image(
    det: AnomalyDetector,
    image: Any,
    output: str,
    *,
    png_tiles: bool, quicklook: bool, geotiff: str | tuple[str, ...] | None, contacts: tuple[str, ...],
    min_area: int, outlines: bool, pyramid: bool, zarr_format: int, overwrite: bool,
    storage_options: dict[str, Any] | None, progress: Any,
) -> dict[str, Any]:
    """Body of :meth:`AnomalyDetector.detect <anomaly_dask.detector.AnomalyDetector.detect>`
    (which holds the defaults and their documentation)."""
    from . import export
    from . import store as out_store
    from .grid import chunk_windows
    from .lease import StoreLease
    from .store_checks import read_group_attrs

    det._check_fitted()
    s = det._settings()
    if storage_options is not None:
        s["storage_options"] = storage_options
    so = s["storage_options"]
    names = (geotiff,) if isinstance(geotiff, str) else tuple(geotiff or ())
    bad = [n for n in names if n not in GEOTIFF_NAMES]
    if bad:
        raise ParameterError(f"geotiff={geotiff!r}: choose among {', '.join(GEOTIFF_NAMES)}")
    contacts = tuple(contacts or ())
    bad = [f for f in contacts if f not in ("geojson", "csv", "gpkg")]
    if bad:
        raise ParameterError(f"contacts={contacts!r}: choose among 'geojson', 'csv', 'gpkg'")
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
        raise ParameterError(f"min_area={min_area!r} must be a positive whole number of pixels")
    if zarr_format not in out_store.ZARR_FORMATS:
        raise ParameterError(f"zarr_format={zarr_format!r} must be 2 or 3")
    t0 = time.perf_counter()
    source, grid = det._open(image, s)
    chunk = s["chunk_size"]
    georef = getattr(source, "georef", None)
    # Everything that shapes the stored scores; a store is resumed only for the same.
    score_settings = {"chunk_size": chunk, "nodata": s["nodata"], "kmeans_neighbors": s["kmeans_neighbors"]}
    shaping = {k: v for k, v in saved_params(s).items() if k not in THRESHOLD_RULES}
    identity = jsonable({
        "model": det._content_fingerprint(), "params": shaping, **score_settings,
        "input": source.name, "shape": [source.height, source.width],
        "input_content": input_identity(source),
    })
    run_id = run_id_of(identity)
    rendering, render_settings = _rendering(det, s, run_id)
    output = normalize_url(output)
    targets = export_targets(
        output, geotiff=names, quicklook=quicklook, png_tiles=png_tiles, contacts=contacts, outlines=outlines
    )
    probe = out_store.OutputStore(output, 1, 1, 1, options_key(so))
    old_attrs = read_group_attrs(probe)
    _check_exports(targets, old_attrs, run_id, so, overwrite)
    attrs = {
        "threshold": det.threshold_, "false_alarm_rate": det.false_alarm_rate_,
        "model_fingerprint": identity["model"], "params": saved_params(s), "score_settings": score_settings,
        "input": source.name, "nodata": source.nodata if s["nodata"] is None else s["nodata"],
        "Conventions": "CF-1.8",
    }
    lease = StoreLease(output, run_id, so)
    with lease:  # one writer per store; released on errors and KeyboardInterrupt too
        store = out_store.OutputStore.create(
            output, source.height, source.width, chunk, run_id, jsonable(attrs),
            storage_options=so, overwrite=overwrite, identity=identity, lease=lease,
            zarr_format=zarr_format, georef=georef,
        )
        store.start_rendering(rendering.id, render_settings, {
            "threshold": det.threshold_, "false_alarm_rate": det.false_alarm_rate_,
        })
        done, drawn = store.done_chunks(), store.rendered_chunks(rendering.id)
        windows = chunk_windows(grid, chunk)
        units = {(iy, ix): Unit(source, grid, w) for iy, row in enumerate(windows) for ix, w in enumerate(row)}
        jobs = [(u, idx) for idx, u in units.items() if idx not in done]
        redraws = [(u, idx) for idx, u in units.items() if idx in done and idx not in drawn]
        total = len(units)
        log.info("%s: %d x %d px, %d chunks (%d to score, %d to redraw) -> %s",
                 source.name, source.height, source.width, total, len(jobs), len(redraws), output)
        n_work = len(jobs) + len(redraws)
        write_pyramid_now = pyramid and (bool(jobs) or not _has_pyramid(store))
        n_steps = n_work + write_pyramid_now + png_tiles + quicklook + len(names) + bool(contacts)

        def report(k: int, n: int, offset: int = 0) -> None:
            lease.check()  # stop at once if another run took the store over
            k += offset
            el = time.perf_counter() - t0
            if k == n_work or k % max(1, n_work // 20) == 0:
                log.info("chunks %d/%d, %.0f s elapsed, ETA %.0f s", k, n_work, el, el / max(k, 1) * (n_work - k))
            if progress is not None:
                progress(k, n_steps)

        def exported() -> None:  # each export counts as one step after the chunks
            nonlocal done_steps
            done_steps += 1
            if progress is not None:
                progress(done_steps, n_steps)

        done_steps = n_work
        if progress is not None:
            progress(0, n_steps)
        with compute.session(s["client"], det._extractor(s), det.dictionary_) as job:
            stats = job.detect(jobs, store, rendering, report)
            redrawn = job.redraw(det.intensity_, redraws, store, rendering,
                                 lambda k, n: report(k, n, len(jobs)))
        # Statistics over every chunk, including those done by an earlier, interrupted run.
        valid, anomalous, max_score = _statistics(store)
        seconds = time.perf_counter() - t0
        summary = {
            "output": str(output), "height": source.height, "width": source.width,
            "chunks": total, "computed_chunks": len(stats), "redrawn_chunks": len(redrawn),
            "valid_pixels": valid, "anomalous_pixels": anomalous,
            "anomalous_fraction": anomalous / max(valid, 1), "max_score": max_score if valid else None,
            "threshold": det.threshold_, "false_alarm_rate": det.false_alarm_rate_, "seconds": seconds,
            "megapixels_per_second": sum(u.window.shape[0] * u.window.shape[1] for u, _ in jobs) / 1e6 / seconds,
            "run_id": run_id, "rendering": rendering.id,
        }
        tags = {"threshold": det.threshold_, "false_alarm_rate": det.false_alarm_rate_,
                "model_fingerprint": identity["model"], "run_id": run_id, "software": "anomaly_dask"}
        if write_pyramid_now:
            from .pyramid import write_pyramid

            summary["pyramid_levels"] = write_pyramid(store)
            exported()
        if png_tiles:
            summary["png_tiles"] = len(export.write_png_tiles(store, "overlay", prefix=targets["png_tiles"] + "/overlay"))
            exported()
        if quicklook:
            export.write_quicklook(store, targets["quicklook"])
            exported()
        for name in names:
            export.write_geotiff(store, targets[f"geotiff_{name}"], name, georef=georef, tags=tags)
            exported()
        if contacts:
            from .contact_files import write_contacts
            from .contacts import contacts_from_store

            found = contacts_from_store(store, det.threshold_, min_area=min_area, outlines=outlines,
                                        image=source.name, georef=georef)
            placed = georef if georef is not None and georef.get("transform") is not None else None
            write_contacts(found, beside(output, ""), crs=placed, formats=contacts, storage_options=so,
                           outlines=outlines)
            summary["contacts"] = len(found)
            exported()
        summary.update({k: v for k, v in targets.items() if k != "png_tiles"})
        lease.check()  # never mark complete a store another run took over
        store.record_exports(targets)
        store.finalize(summary, rendering=rendering.id)
        log.info(
            "%s: %d anomalous pixels (%.3f%% of valid), %.1f s, %.2f Mpx/s",
            source.name, anomalous, 100 * summary["anomalous_fraction"], seconds,
            summary["megapixels_per_second"],
        )
        return summary
