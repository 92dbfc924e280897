"""``anomaly-dask contacts``: a contact list from an existing store, at any threshold.

It reads the store's calibrated ``score`` chunk by chunk (no model, no CNN, no cluster) and
writes ``<base>_contacts.{geojson,csv,gpkg}``. A score ``s`` is reached by a share
``10**-s`` of normal pixels, so ``--false-alarm-rate R`` is the threshold ``-log10(R)``.
Also the ``detect`` options that shape the exports (:func:`add_export_options`).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

__all__ = ["CONTACT_FORMATS", "add_contacts_parser", "add_export_options", "contacts_command", "export_kwargs"]

#: Contact list formats.
CONTACT_FORMATS = ("geojson", "csv", "gpkg")

#: Largest calibrated threshold (a share of 1e-300 of normal pixels).
MAX_THRESHOLD = 300.0


def add_export_options(detect: argparse.ArgumentParser) -> None:
    """The ``detect`` options of the outputs beside the store (contacts, GeoTIFFs, pyramid)."""
    group = detect.add_argument_group("exports (written beside each store: <OUT>/<name>_...)")
    group.add_argument("--geotiff", nargs="+", choices=["mask", "score", "overlay"], default=None,
                       help="also write <name>_<array>.tif: Cloud-Optimized GeoTIFFs with overviews and "
                            "the input's georeference (mask: 1 anomalous, 0 normal, 255 no data)")
    group.add_argument("--contacts", nargs="+", choices=[*CONTACT_FORMATS, "none"], default=list(CONTACT_FORMATS),
                       metavar="FORMAT", help="contact list formats among geojson, csv, gpkg, or none "
                                              "(default: all three)")
    group.add_argument("--min-area", type=int, default=1, metavar="PX",
                       help="smallest contact kept, in pixels (default: 1)")
    group.add_argument("--outlines", action="store_true", help="also write each contact's outline polygon")
    group.add_argument("--no-pyramid", action="store_true", help="do not write the score's OME-Zarr pyramid")
    group.add_argument("--zarr-format", type=int, choices=[2, 3], default=3,
                       help="zarr format of the store: 3 (default) or 2 for readers such as GDAL < 3.11")


def export_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :meth:`AnomalyDetector.detect` from the export options."""
    formats = tuple(f for f in args.contacts if f != "none")
    if "none" in args.contacts and formats:
        raise ValueError("--contacts none cannot be combined with formats")
    return {
        "geotiff": tuple(args.geotiff or ()), "contacts": formats, "min_area": args.min_area,
        "outlines": args.outlines, "pyramid": not args.no_pyramid, "zarr_format": args.zarr_format,
    }


def add_contacts_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``contacts`` subcommand to the subparsers ``sub``."""
    p = sub.add_parser(
        "contacts", help="list contacts of an existing store at any threshold (no CNN)",
        description="Derive the contact list of a finished detect store from its scores, at the "
                    "store's threshold or another one, without the model or the CNN.",
    )
    p.add_argument("store", metavar="STORE", help="store written by detect (<OUT>/<name>.zarr)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--threshold", type=float, metavar="T",
                       help="calibrated threshold in [0, 300] (default: the store's)")
    level.add_argument("--false-alarm-rate", type=float, metavar="R",
                       help="share of normal pixels marked, in (0, 1]: the threshold -log10(R)")
    p.add_argument("--min-area", type=int, default=1, metavar="PX", help="smallest contact kept (default: 1)")
    p.add_argument("--outlines", action="store_true", help="also write each contact's outline polygon")
    p.add_argument("--formats", nargs="+", choices=CONTACT_FORMATS, default=list(CONTACT_FORMATS),
                   help="files to write (default: all three)")
    p.add_argument("--output", metavar="BASE",
                   help="file name prefix (default: beside the store, <name>_t<threshold>)")
    p.add_argument("--overwrite", action="store_true", help="replace contact files that exist")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option, repeatable (as for detect)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    return p


def _threshold(args: argparse.Namespace, recorded: Any) -> float:
    if args.false_alarm_rate is not None:
        rate = args.false_alarm_rate
        if not (math.isfinite(rate) and 0.0 < rate <= 1.0):
            raise ValueError(f"--false-alarm-rate {rate} must be in (0, 1]")
        return -math.log10(rate)
    if args.threshold is not None:
        t = args.threshold
        if not (math.isfinite(t) and 0.0 <= t <= MAX_THRESHOLD):
            raise ValueError(f"--threshold {t} must be in [0, {MAX_THRESHOLD:g}] (calibrated units)")
        return float(t)
    if recorded is None:
        raise ValueError("the store records no threshold; give --threshold or --false-alarm-rate")
    return float(recorded)


def contacts_command(args: argparse.Namespace, options: dict[str, Any] | None) -> dict[str, Any]:
    """Run ``contacts``; its JSON summary.

    Raises
    ------
    InputNotFoundError
        No store at ``STORE``.
    OutputIncompleteError
        The store has chunks without scores.
    OutputExistsError
        A contact file exists and ``--overwrite`` is not given.
    """
    import fsspec

    from .contact_files import write_contacts
    from .contacts import contacts_from_store
    from .errors import OutputExistsError, ParameterError
    from .georef import from_attrs
    from .locations import beside
    from .store import OutputStore

    if args.min_area < 1:
        raise ParameterError(f"--min-area {args.min_area} must be a positive number of pixels")
    store = OutputStore.open(args.store, storage_options=options)
    attrs = store.attrs
    threshold = _threshold(args, attrs.get("threshold"))
    base = args.output or beside(store.url, f"_t{threshold:g}")
    names = [f"{base}_contacts.{f}" for f in args.formats]
    if args.outlines and "geojson" in args.formats:
        names.append(f"{base}_outlines.geojson")
    for url in names:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
        if fs.exists(path) and not args.overwrite:
            raise OutputExistsError(f"{url} exists; pass --overwrite to replace it, or choose --output")
    georef = from_attrs(attrs)
    found = contacts_from_store(store, threshold, min_area=args.min_area, outlines=args.outlines)
    placed = georef if georef is not None and georef.get("transform") is not None else None
    files = write_contacts(found, base, crs=placed, formats=args.formats, storage_options=options,
                           outlines=args.outlines)
    return {
        "store": store.url, "threshold": threshold, "false_alarm_rate": 10.0**-threshold,
        "contacts": len(found), "files": files,
        "top": [{k: c[k] for k in ("id", "peak_score", "area_px", "centroid_row", "centroid_col")} for c in found[:5]],
    }
