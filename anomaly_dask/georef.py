"""Georeference: where a raster lies on the ground, read from GeoTIFF inputs and carried to outputs.

This is the only module that interprets or produces georeferencing. Everything else passes
a :class:`Georef` along without looking inside, except for its ``transform``.

The one form
------------
A :class:`Georef` is a plain, JSON-able dict with three keys:

``crs_epsg`` : int or None
    EPSG code of the coordinate reference system, when the CRS is exactly an EPSG one.
``crs_wkt`` : str or None
    WKT2 (2019) of a CRS without an EPSG code; None whenever ``crs_epsg`` is set.
``transform`` : list of 6 float or None
    GDAL geotransform ``[x0, a, b, y0, d, e]``: pixel column ``c``, row ``r`` has its
    top-left corner at ``x = x0 + a c + b r``, ``y = y0 + d c + e r`` (the PixelIsArea
    convention; inputs tagged PixelIsPoint are shifted by half a pixel, as GDAL does).
    None when the raster is placed by ground control points only.

Reading
-------
:func:`georef_from_page` takes the GeoTIFF tags of a TIFF header that ``tifffile`` has
already parsed and lets GDAL (through ``rasterio``) decode them: the tag values are copied
into a one-pixel TIFF in memory, which GDAL opens. The input file is therefore read once,
through whatever fsspec filesystem it lives on, and every CRS GDAL understands -- EPSG-coded
or user-defined, projected or geographic -- is read exactly as GDAL tools read it.

Writing
-------
GeoTIFF outputs are written by ``rasterio`` (:func:`to_rasterio` gives the CRS and affine
transform to create them with). Zarr outputs carry the dict itself as an attribute
(:func:`to_attrs`, :func:`from_attrs`) and, for other tools, the standard forms: a CF
``grid_mapping`` variable with the WKT and GDAL's ``GeoTransform``
(:func:`grid_mapping_attrs`) and x / y coordinates of pixel centres (:func:`pixel_centres`).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from .errors import InputNotFoundError, ParameterError

if TYPE_CHECKING:
    from affine import Affine
    from rasterio.crs import CRS

__all__ = [
    "ATTRS_KEY",
    "GRID_MAPPING",
    "Georef",
    "as_georef",
    "from_attrs",
    "georef_from_page",
    "georef_from_tiff",
    "grid_mapping_attrs",
    "make_georef",
    "pixel_centres",
    "scale_georef",
    "to_attrs",
    "to_rasterio",
]

#: Attribute of a zarr group or array that holds its georeference.
ATTRS_KEY = "georef"

#: TIFF tags that place an image (GeoTIFF 1.1): ModelPixelScale, ModelTiepoint,
#: ModelTransformation, GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams.
_GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)
_PIXEL_SCALE, _TIEPOINT, _TRANSFORMATION = 33550, 33922, 34264
_ASCII = 2  # TIFF data type of text tags

_KEYS = ("crs_epsg", "crs_wkt", "transform")


class Georef(TypedDict):
    """The georeference of a raster (see the module documentation for each key)."""

    crs_epsg: int | None
    crs_wkt: str | None
    transform: list[float] | None


# --------------------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------------------


def as_georef(value: Mapping[str, Any] | None) -> Georef | None:
    """Check a georeference given as a mapping and return it in the one form.

    Parameters
    ----------
    value : mapping or None
        Keys among ``crs_epsg``, ``crs_wkt`` and ``transform`` (missing keys are None).

    Returns
    -------
    Georef or None
        A new dict; None when ``value`` is None or says nothing (every key None).

    Raises
    ------
    ParameterError
        Unknown keys, a transform that is not 6 finite numbers, an EPSG code that is not a
        positive integer, an empty WKT, or both a code and a WKT.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ParameterError(
            f"georef must be a dict with keys {', '.join(_KEYS)}, got {type(value).__name__}"
        )
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise ParameterError(f"georef has unknown keys {unknown}; its keys are {', '.join(_KEYS)}")
    transform = _check_transform(value.get("transform"))
    epsg, wkt = value.get("crs_epsg"), value.get("crs_wkt")
    if epsg is not None:
        if isinstance(epsg, bool) or not isinstance(epsg, (int, np.integer)) or epsg <= 0:
            raise ParameterError(f"georef['crs_epsg'] must be a positive integer EPSG code, got {epsg!r}")
        epsg = int(epsg)
    if wkt is not None and (not isinstance(wkt, str) or not wkt.strip()):
        raise ParameterError(f"georef['crs_wkt'] must be a WKT string, got {wkt!r}")
    if epsg is not None and wkt is not None:
        raise ParameterError("georef gives both crs_epsg and crs_wkt; give one of them")
    if transform is None and epsg is None and wkt is None:
        return None
    return Georef(crs_epsg=epsg, crs_wkt=wkt, transform=transform)


def _check_transform(transform: Any) -> list[float] | None:
    if transform is None:
        return None
    try:
        values = [float(v) for v in transform]
    except (TypeError, ValueError):
        values = []
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise ParameterError(f"georef['transform'] must have 6 numbers (GDAL order), got {transform}")
    return values


def make_georef(crs: Any = None, transform: Any = None) -> Georef | None:
    """A georeference from a CRS in any form GDAL reads and a transform.

    Parameters
    ----------
    crs : int, str or rasterio.crs.CRS, optional
        An EPSG code, ``"EPSG:32631"``, WKT, a PROJ string, or a CRS object.
    transform : sequence of 6 float or affine.Affine, optional
        A GDAL geotransform ``(x0, a, b, y0, d, e)``, or an affine transform.

    Returns
    -------
    Georef or None
        None when both are None.

    Raises
    ------
    ParameterError
        ``crs`` is not a CRS GDAL knows, or ``transform`` is malformed.
    """
    epsg = wkt = None
    if crs is not None:
        from rasterio.crs import CRS
        from rasterio.errors import CRSError

        try:
            epsg, wkt = _crs_fields(CRS.from_user_input(crs))
        except CRSError as err:
            raise ParameterError(
                f"crs {crs!r} is not a coordinate reference system GDAL knows ({err})"
            ) from err
    if transform is not None and hasattr(transform, "to_gdal"):
        transform = transform.to_gdal()
    return as_georef({"crs_epsg": epsg, "crs_wkt": wkt, "transform": transform})


def _crs_fields(crs: CRS | None) -> tuple[int | None, str | None]:
    """``(crs_epsg, crs_wkt)`` of a CRS: its EPSG code when it is exactly one, else its WKT2."""
    if crs is None:
        return None, None
    epsg = crs.to_epsg(confidence_threshold=100)
    if epsg is not None:
        return int(epsg), None
    return None, crs.to_wkt(version="WKT2_2019")


def scale_georef(georef: Georef | None, fy: float, fx: float) -> Georef | None:
    """Georeference of a resampled copy whose pixels are ``fy`` x ``fx`` original pixels.

    Parameters
    ----------
    georef : Georef or None
        The original georeference.
    fy, fx : float
        Size of a new pixel in original pixels, along rows and columns; the copy covers
        the same area from the same top-left corner.

    Returns
    -------
    Georef or None
        Same CRS, transform scaled; None when ``georef`` is None.
    """
    if georef is None:
        return None
    if fy <= 0 or fx <= 0:
        raise ParameterError(f"scale factors must be > 0, got {fy}, {fx}")
    out = Georef(crs_epsg=georef["crs_epsg"], crs_wkt=georef["crs_wkt"], transform=None)
    t = georef["transform"]
    if t is not None:
        out["transform"] = [t[0], t[1] * fx, t[2] * fy, t[3], t[4] * fx, t[5] * fy]
    return out


# --------------------------------------------------------------------------------------
# Reading GeoTIFF inputs
# --------------------------------------------------------------------------------------


def georef_from_page(page: Any, name: str = "TIFF") -> Georef | None:
    """The georeference of a TIFF page, decoded by GDAL from the tags tifffile parsed.

    Parameters
    ----------
    page : tifffile.TiffPage
        A page of an open file (its tags are read; nothing else is).
    name : str
        The file's name, for the warning when the tags cannot be decoded.

    Returns
    -------
    Georef or None
        None when the page has no GeoTIFF tags (or unreadable ones, with a warning).
    """
    tags = [page.tags.get(code) for code in _GEO_TAGS]
    present = {tag.code: tag for tag in tags if tag is not None}
    if not present:
        return None
    try:
        crs, transform, has_gcps = _decode_with_gdal(present.values())
    except Exception as err:  # noqa: BLE001 - malformed tags must not stop reading the pixels
        warnings.warn(
            f"{name}: its GeoTIFF tags cannot be decoded ({type(err).__name__}: {err}); "
            f"reading it without georeference",
            stacklevel=2,
        )
        return None
    placed = _TRANSFORMATION in present or (_PIXEL_SCALE in present and _TIEPOINT in present)
    epsg, wkt = _crs_fields(crs)
    return as_georef(
        {"crs_epsg": epsg, "crs_wkt": wkt, "transform": transform if placed and not has_gcps else None}
    )


def _decode_with_gdal(tags: Any) -> tuple[CRS | None, tuple[float, ...], bool]:
    """CRS, GDAL geotransform and whether there are control points, of these tags.

    The tags are copied as they are into a one-pixel TIFF in memory, which GDAL opens.
    """
    import rasterio
    import tifffile
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    extratags = []
    for tag in tags:
        if int(tag.dtype) == _ASCII:
            extratags.append((tag.code, _ASCII, 0, str(tag.value), True))
        else:
            values = tuple(np.atleast_1d(np.asarray(tag.value)).ravel().tolist())
            extratags.append((tag.code, int(tag.dtype), len(values), values, True))
    stub = io.BytesIO()
    tifffile.imwrite(stub, np.zeros((1, 1), np.uint8), extratags=extratags, metadata=None)
    with rasterio.Env(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(stub.getvalue()) as memory, memory.open() as ds:
            gcps, gcp_crs = ds.gcps
            # GDAL gives the CRS of a raster placed by control points as theirs
            return (gcp_crs if gcps else ds.crs), ds.transform.to_gdal(), bool(gcps)


def georef_from_tiff(url: str, storage_options: Mapping[str, Any] | None = None) -> Georef | None:
    """Read the georeference of a (Geo)TIFF file; only its header is read.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of the TIFF.
    storage_options : dict, optional
        fsspec options.

    Returns
    -------
    Georef or None
        That of the first page; None when it has no GeoTIFF tags.

    Raises
    ------
    InputNotFoundError
        The file does not exist.
    """
    import fsspec
    import tifffile

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f, tifffile.TiffFile(f) as tif:
            return georef_from_page(tif.pages.first, url)
    except FileNotFoundError as err:
        raise InputNotFoundError(f"{url!r} does not exist: check the path or URL") from err


# --------------------------------------------------------------------------------------
# Writing: GeoTIFF through rasterio, zarr attributes
# --------------------------------------------------------------------------------------


def to_rasterio(georef: Mapping[str, Any] | None) -> tuple[CRS | None, Affine | None]:
    """The CRS and affine transform to create a rasterio dataset with.

    Parameters
    ----------
    georef : Georef or mapping or None
        Checked with :func:`as_georef`.

    Returns
    -------
    (rasterio.crs.CRS or None, affine.Affine or None)
        None for what ``georef`` does not give.

    Raises
    ------
    ParameterError
        ``georef`` is malformed or names a CRS GDAL does not know.
    """
    geo = as_georef(georef)
    if geo is None:
        return None, None
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    crs = None
    try:
        if geo["crs_epsg"] is not None:
            crs = CRS.from_epsg(geo["crs_epsg"])
        elif geo["crs_wkt"] is not None:
            crs = CRS.from_wkt(geo["crs_wkt"])
    except CRSError as err:
        what = f"EPSG:{geo['crs_epsg']}" if geo["crs_epsg"] is not None else "crs_wkt"
        raise ParameterError(
            f"georef: {what} is not a coordinate reference system GDAL knows ({err})"
        ) from err
    transform = None if geo["transform"] is None else Affine.from_gdal(*geo["transform"])
    return crs, transform


def to_attrs(georef: Mapping[str, Any] | None) -> dict[str, Any]:
    """Zarr attributes that record ``georef`` (merge them into a group's or array's).

    Parameters
    ----------
    georef : Georef or mapping or None
        Checked with :func:`as_georef`.

    Returns
    -------
    dict
        ``{"georef": <the dict, or None>}``, JSON-able.
    """
    geo = as_georef(georef)
    return {ATTRS_KEY: None if geo is None else dict(geo)}


def from_attrs(attrs: Mapping[str, Any]) -> Georef | None:
    """The georeference recorded in zarr attributes by :func:`to_attrs`.

    Parameters
    ----------
    attrs : mapping
        Attributes of a zarr group or array (e.g. an output store's).

    Returns
    -------
    Georef or None
        None when they record none.
    """
    return as_georef(attrs.get(ATTRS_KEY))


# --------------------------------------------------------------------------------------
# CF / GDAL attributes for zarr stores (xarray, rioxarray, GDAL's Zarr driver)
# --------------------------------------------------------------------------------------

#: Name of the scalar variable that holds a store's CRS (the CF ``grid_mapping``).
GRID_MAPPING = "spatial_ref"


def _pyproj_crs(geo: Georef) -> Any:
    import pyproj

    if geo["crs_epsg"] is not None:
        return pyproj.CRS.from_epsg(geo["crs_epsg"])
    if geo["crs_wkt"] is not None:
        return pyproj.CRS.from_wkt(geo["crs_wkt"])
    return None


def grid_mapping_attrs(georef: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Attributes of the CF ``grid_mapping`` variable :data:`GRID_MAPPING` of ``georef``.

    They hold the CF projection parameters (from ``pyproj``), the WKT under both names
    readers look for (``crs_wkt`` for CF, ``spatial_ref`` for GDAL and rioxarray) and,
    with a transform, GDAL's ``GeoTransform`` (six numbers separated by spaces).

    Parameters
    ----------
    georef : Georef or mapping or None

    Returns
    -------
    dict or None
        None when ``georef`` names no CRS and no transform.
    """
    geo = as_georef(georef)
    if geo is None:
        return None
    crs = _pyproj_crs(geo)
    attrs: dict[str, Any] = {}
    if crs is not None:
        attrs.update({k: v for k, v in crs.to_cf().items() if v is not None})
        attrs["crs_wkt"] = crs.to_wkt()
        attrs["spatial_ref"] = crs.to_wkt()
    if geo["transform"] is not None:
        attrs["GeoTransform"] = " ".join(repr(float(v)) for v in geo["transform"])
    return attrs


def pixel_centres(
    georef: Mapping[str, Any] | None, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, Any]] | None:
    """The x and y coordinates of pixel centres, with their CF attributes.

    Parameters
    ----------
    georef : Georef or mapping or None
    height, width : int
        Raster size in pixels.

    Returns
    -------
    (x, y, x_attrs, y_attrs) or None
        float64 arrays of length ``width`` and ``height``; None without a transform or
        when the transform is rotated (then no 1-D coordinates exist; readers use the
        ``GeoTransform`` of :func:`grid_mapping_attrs`).
    """
    geo = as_georef(georef)
    if geo is None or geo["transform"] is None:
        return None
    x0, a, b, y0, d, e = geo["transform"]
    if b != 0 or d != 0:
        return None
    x = x0 + a * (np.arange(width, dtype=np.float64) + 0.5)
    y = y0 + e * (np.arange(height, dtype=np.float64) + 0.5)
    crs = _pyproj_crs(geo)
    axes = {} if crs is None else {ax.get("axis"): ax for ax in crs.cs_to_cf()}
    x_attrs = {k: v for k, v in axes.get("X", {}).items() if k != "axis"}
    y_attrs = {k: v for k, v in axes.get("Y", {}).items() if k != "axis"}
    x_attrs.setdefault("long_name", "x coordinate of pixel centre")
    y_attrs.setdefault("long_name", "y coordinate of pixel centre")
    return x, y, {**x_attrs, "axis": "X"}, {**y_attrs, "axis": "Y"}
