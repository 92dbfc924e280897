"""Contact lists written as GeoJSON, CSV and GeoPackage files.

The contacts of :mod:`anomaly_dask.contacts` become points at their centroids, with every
field but the outline as attributes:

``<base>_contacts.geojson``
    A GeoJSON feature collection of the points (layer ``contacts``); with outlines, their
    polygons go to ``<base>_outlines.geojson``.
``<base>_contacts.gpkg``
    A GeoPackage with the layer ``contacts`` and, with outlines, ``outlines``
    (MultiPolygons, with ``id``, ``image``, ``area_px`` and ``peak_score``).
``<base>_contacts.csv``
    The same attributes, one row per contact, with a header row (empty cells for None).

Points and outlines are in the contacts' map coordinates when they were placed by a
transform, in the given CRS. Otherwise they are in pixel coordinates, ``x = column``,
``y = row`` (continuous, so a pixel's centre is at ``(c + 0.5, r + 0.5)``), with no CRS;
readers of GeoJSON then assume WGS 84 longitude/latitude, so prefer the GeoPackage or the
CSV for pixel coordinates.

The spatial files are written through ``pyogrio``'s raw interface with shapely WKB
geometries (no geopandas needed). Every file is first written under a temporary name in a
temporary folder beside its destination and moved into place when complete; for a remote
URL it is written locally and uploaded (object stores: straight to the final key, which
appears only when complete; other filesystems: to a temporary name, then moved). No
partial file ever carries a final name.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from .contacts import BASE_FIELDS, MAP_FIELDS, area_field
from .errors import OutputLocationError, ParameterError
from .georef import to_rasterio
from .locations import is_local, normalize_url, publish

if TYPE_CHECKING:
    from rasterio.crs import CRS

__all__ = ["FORMATS", "write_contacts"]

#: File formats :func:`write_contacts` writes.
FORMATS = ("geojson", "csv", "gpkg")

_DRIVERS = {"geojson": "GeoJSON", "gpkg": "GPKG"}
_INT_FIELDS = frozenset({"id", "area_px", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "peak_row", "peak_col"})
_STR_FIELDS = frozenset({"image", "map_units"})
_OUTLINE_FIELDS = ("id", "image", "area_px", "peak_score")


def _as_crs(crs: Any) -> CRS | None:
    """A rasterio CRS from a Georef mapping or anything ``CRS.from_user_input`` reads."""
    if crs is None:
        return None
    if isinstance(crs, Mapping):
        return to_rasterio(crs)[0]
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        return CRS.from_user_input(crs)
    except CRSError as err:
        raise ParameterError(f"crs {crs!r} is not a coordinate reference system GDAL knows ({err})") from err


def _crs_text(crs: CRS | None) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg(confidence_threshold=100)
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()


def _fields(contacts: Sequence[Mapping[str, Any]], crs: CRS | None) -> list[str]:
    """Column names: those of the contacts (the base ones, then map ones), in a fixed order."""
    if contacts:
        present = set(contacts[0])
        for c in contacts[1:]:
            if set(c) != present:
                raise ParameterError("the contacts do not all have the same fields: list them in one call")
        known = [*BASE_FIELDS, *MAP_FIELDS, "area_m2", "area_map_units2", "map_units"]
        extra = sorted(present - set(known) - {"outline"})
        return [k for k in known if k in present] + extra
    fields = list(BASE_FIELDS)
    if crs is not None:  # an empty list in a CRS: the columns georeferenced contacts would have
        fields += [*MAP_FIELDS, area_field(crs)[0], "map_units"]
    return fields


def _column(contacts: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    values = [c[key] for c in contacts]
    if key in _INT_FIELDS:
        return np.asarray(values, dtype=np.int64)
    if key in _STR_FIELDS or any(isinstance(v, str) for v in values):
        return np.asarray([None if v is None else str(v) for v in values], dtype=object)
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _points(contacts: Sequence[Mapping[str, Any]], mapped: bool) -> np.ndarray:
    import shapely

    xs = [c["centroid_x"] if mapped else c["centroid_col"] for c in contacts]
    ys = [c["centroid_y"] if mapped else c["centroid_row"] for c in contacts]
    return np.asarray(shapely.to_wkb(shapely.points(xs, ys)) if contacts else [], dtype=object)


def _multipolygons(contacts: Sequence[Mapping[str, Any]]) -> np.ndarray:
    import shapely

    geoms = []
    for c in contacts:
        geom = c["outline"]
        geoms.append(shapely.MultiPolygon([geom]) if geom.geom_type == "Polygon" else geom)
    return np.asarray(shapely.to_wkb(geoms) if geoms else [], dtype=object)


def _write_layer(
    path: str, driver: str, layer: str, geometry: np.ndarray, columns: dict[str, np.ndarray],
    geometry_type: str, crs: str | None,
) -> None:  # fmt: skip
    import pyogrio.raw

    with warnings.catch_warnings():
        # pixel coordinates have no CRS on purpose
        warnings.filterwarnings("ignore", message="'crs' was not provided")
        pyogrio.raw.write(
            path, geometry, list(columns.values()), list(columns), layer=layer, driver=driver,
            geometry_type=geometry_type, crs=crs,
        )  # fmt: skip


def _write_csv(path: str, contacts: Sequence[Mapping[str, Any]], fields: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for c in contacts:
            writer.writerow(["" if c[k] is None else repr(c[k]) if isinstance(c[k], float) else c[k]
                             for k in fields])  # fmt: skip




def write_contacts(
    contacts: Sequence[Mapping[str, Any]],
    base_url: str | os.PathLike[str],
    *,
    crs: Any = None,
    formats: Sequence[str] = FORMATS,
    storage_options: Mapping[str, Any] | None = None,
    outlines: bool | None = None,
) -> dict[str, str]:
    """Write a contact list as GeoJSON, CSV and/or GeoPackage files.

    Parameters
    ----------
    contacts : sequence of dict
        Contacts from :func:`~anomaly_dask.contacts.find_contacts` (all of one call). When
        they carry ``outline`` polygons, these are written too (GeoJSON and GeoPackage).
    base_url : str or os.PathLike
        Local path or fsspec URL the file names start with: ``<base>_contacts.geojson``,
        ``<base>_contacts.csv``, ``<base>_contacts.gpkg`` (and ``<base>_outlines.geojson``).
    crs : Georef mapping, int, str or rasterio.crs.CRS, optional
        CRS of the contacts' map coordinates (a Georef, an EPSG code, ``"EPSG:32631"``,
        WKT, ...). Must be None for contacts in pixel coordinates.
    formats : sequence of str
        Among ``"geojson"``, ``"csv"``, ``"gpkg"``.
    storage_options : dict, optional
        fsspec options for a remote ``base_url``.
    outlines : bool, optional
        Write the outline layers even when there are no contacts (None: when the contacts
        carry outlines).

    Returns
    -------
    dict of str to str
        URL of each file written, by format (``"outlines_geojson"`` for the outline file).

    Raises
    ------
    ParameterError
        Unknown formats; a CRS GDAL does not know, or one given for contacts in pixel
        coordinates; contacts with different fields.
    OutputLocationError
        The local folder of ``base_url`` does not exist.
    """
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ParameterError(f"formats must be among {FORMATS}, got {list(formats)!r}")
    crs_obj = _as_crs(crs)
    mapped = bool(contacts) and "centroid_x" in contacts[0]
    if contacts and crs_obj is not None and not mapped:
        raise ParameterError("the contacts are in pixel coordinates (no transform): pass crs=None")
    fields = _fields(contacts, crs_obj)
    columns = {k: _column(contacts, k) for k in fields}
    has_outlines = (bool(contacts) and all("outline" in c for c in contacts)) or bool(outlines)
    crs_text = _crs_text(crs_obj)

    base = normalize_url(base_url)
    fs, base_path = fsspec.core.url_to_fs(base, **dict(storage_options or {}))
    local = is_local(fs)
    folder = os.path.dirname(base_path)
    if local and not os.path.isdir(folder):
        raise OutputLocationError(f"{base}: folder {folder} does not exist")
    names = {fmt: f"_contacts.{fmt}" for fmt in formats}
    if has_outlines and "geojson" in formats:
        names["outlines_geojson"] = "_outlines.geojson"

    work_dir = tempfile.mkdtemp(prefix=".contacts_", dir=folder if local else None)
    written: dict[str, str] = {}
    try:
        for key, suffix in names.items():
            tmp = os.path.join(work_dir, os.path.basename(base_path) + suffix)
            if key == "csv":
                _write_csv(tmp, contacts, fields)
            elif key == "outlines_geojson":
                outline_cols = {k: columns[k] for k in _OUTLINE_FIELDS}
                _write_layer(tmp, "GeoJSON", "outlines", _multipolygons(contacts), outline_cols,
                             "MultiPolygon", crs_text)  # fmt: skip
            else:
                _write_layer(
                    tmp, _DRIVERS[key], "contacts", _points(contacts, mapped), columns, "Point", crs_text
                )
                if key == "gpkg" and has_outlines:
                    outline_cols = {k: columns[k] for k in _OUTLINE_FIELDS}
                    _write_layer(tmp, "GPKG", "outlines", _multipolygons(contacts), outline_cols,
                                 "MultiPolygon", crs_text)  # fmt: skip
            publish(fs, tmp, base_path + suffix)
            written[key] = base + suffix
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return written
