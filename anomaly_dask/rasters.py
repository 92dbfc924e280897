"""Lazy raster inputs: tiled or striped (Geo)TIFF files and zarr arrays read window by window.

A :class:`TiffSource` or :class:`ZarrSource` is a small, frozen, picklable description of
one huge image (its URL, shape, dtype, no-data value and georeference). Nothing that holds
an open file lives in it: :meth:`~TiffSource.read` opens the file the first time a process
needs it, keeps it open in a per-process cache, and reads only the tiles or strips that
intersect the requested window. A Dask task therefore ships a few hundred bytes and reads
only its own window, whatever the size of the image.

TIFF files are read with ``tifffile`` through a file object from ``fsspec``, so local
paths and any fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``, ...) work;
zarr arrays are opened with ``zarr`` (formats 2 and 3). :func:`open_raster` picks the right
source from the URL and returns None for ordinary images (PNG, JPEG, ...), which are left
to Pillow (:func:`anomaly_dask.sources.open_source`).

No-data
-------
``nodata`` is the value of the ``GDAL_NODATA`` TIFF tag (or the ``nodata`` /
``_FillValue`` / ``missing_value`` attribute of a zarr array), None when absent. NaN is
always no-data in float rasters whatever ``nodata`` says: it is not reported separately.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .errors import AnomalyDaskError, ImageReadError, InputNotFoundError, ParameterError
from .sources import ImageSource

__all__ = [
    "RASTER_DTYPES",
    "TIFF_EXTENSIONS",
    "ZARR_EXTENSIONS",
    "TiffSource",
    "ZarrSource",
    "clear_cache",
    "geotiff_tags",
    "is_raster",
    "open_raster",
]

TIFF_EXTENSIONS = (".tif", ".tiff")
ZARR_EXTENSIONS = (".zarr",)

#: Pixel types a raster may have (native byte order); anything else is refused on open.
RASTER_DTYPES = tuple(
    np.dtype(t) for t in ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
)

_PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_REMOTE_BLOCK_SIZE = 256 * 1024  # read-ahead of remote files (s3fs defaults to many MiB)
_CACHE_SIZE = 32  # open files kept per process

# TIFF photometric interpretations that can be read as gray or RGB pixels
_PHOTOMETRIC_OK = {0: "MINISWHITE", 1: "MINISBLACK", 2: "RGB", 3: "PALETTE", 6: "YCBCR"}
_PALETTE = 3

# GeoTIFF tags and keys
_TAG_PIXEL_SCALE = 33550
_TAG_TIEPOINT = 33922
_TAG_TRANSFORMATION = 34264
_TAG_GEOKEYS = 34735
_TAG_GEODOUBLES = 34736
_TAG_GEOASCII = 34737
_TAG_GDAL_NODATA = 42113
_GEO_TAG_NAMES = {
    _TAG_PIXEL_SCALE: "ModelPixelScaleTag",
    _TAG_TIEPOINT: "ModelTiepointTag",
    _TAG_TRANSFORMATION: "ModelTransformationTag",
    _TAG_GEOKEYS: "GeoKeyDirectoryTag",
    _TAG_GEODOUBLES: "GeoDoubleParamsTag",
    _TAG_GEOASCII: "GeoAsciiParamsTag",
}
_KEY_RASTER_TYPE = 1025
_KEY_GEOGRAPHIC_TYPE = 2048
_KEY_PROJECTED_TYPE = 3072
_RASTER_PIXEL_IS_POINT = 2
_USER_DEFINED = 32767

# zarr dimension names understood as rows, columns and bands
_Y_NAMES = {"y", "row", "rows", "line", "lines", "lat", "latitude", "northing", "height"}
_X_NAMES = {"x", "col", "cols", "column", "columns", "lon", "longitude", "easting", "width"}
_BAND_NAMES = {
    "c",
    "s",
    "band",
    "bands",
    "channel",
    "channels",
    "sample",
    "samples",
    "rgb",
    "color",
    "colour",
}


# --------------------------------------------------------------------------------------
# Per-process cache of open files
# --------------------------------------------------------------------------------------


class _HandleCache:
    """Least-recently-used map of open readers, private to each process.

    Keys include the process id, so a child forked from a process that already had a file
    open opens its own (a shared file offset would interleave the reads of both). Readers
    are opened outside the lock; when two threads open the same file at once, one copy is
    kept. An evicted reader is closed when the last thread using it lets it go.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, factory: Callable[[], Any]) -> Any:
        key = (os.getpid(), *key)
        with self._lock:
            handle = self._items.get(key)
            if handle is not None:
                self._items.move_to_end(key)
                return handle
        handle = factory()
        with self._lock:
            handle = self._items.setdefault(key, handle)
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return handle

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_TIFF_CACHE = _HandleCache(_CACHE_SIZE)
_ZARR_CACHE = _HandleCache(_CACHE_SIZE)


def clear_cache() -> None:
    """Forget the files this process holds open (they close once no read is using them).

    Later reads reopen them, as a fresh worker process would.
    """
    _TIFF_CACHE.clear()
    _ZARR_CACHE.clear()


def _options_items(storage_options: Mapping[str, Any] | None) -> tuple:
    """Storage options as a sorted tuple of ``(key, value)`` items (the dataclass field)."""
    return tuple(sorted((storage_options or {}).items()))


def _options_token(items: tuple) -> str:
    """A hashable cache key for storage options whose values may be unhashable (dicts)."""
    return repr(items)


def _close_quietly(*objects: Any) -> None:
    for obj in objects:
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - closing during garbage collection must not raise
            pass


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _url_path(url: str) -> str:
    """The path part of a URL or local path, without query and trailing slashes, lower-case."""
    path = url.split("?", 1)[0] if "://" in url else url
    return path.rstrip("/\\").lower()


def _check_window(source: Any, y0: int, y1: int, x0: int, x1: int) -> None:
    if not (0 <= y0 <= y1 <= source.height and 0 <= x0 <= x1 <= source.width):
        raise ParameterError(
            f"{source.name}: window y {y0}:{y1}, x {x0}:{x1} is not inside the image "
            f"({source.height} x {source.width} pixels); use read_window to pad outside windows"
        )


def _check_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """Native-order ``dtype``, or ImageReadError naming the supported types."""
    native = np.dtype(dtype).newbyteorder("=")
    if native in RASTER_DTYPES:
        return native
    if native == np.bool_:
        what = "1-bit (bilevel)"
    elif native.kind == "c":
        what = f"complex ({native})"
    else:
        what = str(native)
    supported = ", ".join(str(t) for t in RASTER_DTYPES)
    hint = "store the magnitude as float32" if native.kind == "c" else "e.g. gdal_translate -ot Float32"
    raise ImageReadError(
        f"{name}: {what} pixels are not supported; convert the raster to one of {supported} ({hint})"
    )


def _check_bands(bands: int, name: str) -> int:
    """Channels exposed for ``bands`` bands in the file: 1, 3, or 3 of 4."""
    if bands in (1, 3):
        return bands
    if bands == 4:
        return 3
    raise ImageReadError(
        f"{name}: {bands} bands are not supported; the image must have 1 (gray), 3 (RGB) or "
        f"4 (RGBA, alpha ignored) bands - extract the bands to use (e.g. gdal_translate -b 1)"
    )


def _select(array: Any, axes: str, y0: int, y1: int, x0: int, x1: int, channels: int) -> np.ndarray:
    """Read a window of an array with normalised ``axes`` (Y, X, optional S, others Q).

    Q axes are read at index 0; the S (band) axis is read up to ``channels``.

    Returns
    -------
    numpy.ndarray
        Native-order, C-contiguous ``(h, w, bands)`` pixels.
    """
    index: list[slice | int] = []
    for ax in axes:
        if ax == "Y":
            index.append(slice(y0, y1))
        elif ax == "X":
            index.append(slice(x0, x1))
        elif ax == "S":
            index.append(slice(0, channels))
        else:
            index.append(0)
    out = np.asarray(array[tuple(index)])
    kept = [ax for ax in axes if ax in "YXS"]
    out = np.transpose(out, [kept.index(ax) for ax in "YXS" if ax in kept])
    if "S" not in kept:
        out = out[:, :, None]
    return _native(out)


def _native(a: np.ndarray) -> np.ndarray:
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def _parse_nodata(value: Any, name: str) -> float | None:
    """A no-data value from a tag string or attribute, None when absent or unusable."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip().strip("\x00").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        warnings.warn(f"{name}: ignoring unreadable no-data value {text!r}", stacklevel=3)
        return None


# --------------------------------------------------------------------------------------
# GeoTIFF georeference
# --------------------------------------------------------------------------------------


def _tag_value(page: Any, code: int) -> Any:
    tag = page.tags.get(code)
    return None if tag is None else tag.value


def _jsonable(value: Any) -> Any:
    """Tag values as JSON-able lists, floats, ints and strings."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, int)):
        return int(value)
    return float(value)


def _parse_geokeys(
    directory: list[int], doubles: list[float] | None, ascii_params: str | None
) -> dict[int, Any]:
    """GeoKey id -> value (int, tuple of floats, or string) from the raw GeoTIFF tags."""
    keys: dict[int, Any] = {}
    if len(directory) < 4:
        return keys
    count = directory[3]
    for i in range(count):
        entry = directory[4 + 4 * i : 8 + 4 * i]
        if len(entry) < 4:
            break
        key, location, n, value = entry
        if location == 0:
            keys[key] = value
        elif location == _TAG_GEODOUBLES and doubles is not None:
            keys[key] = tuple(doubles[value : value + n])
        elif location == _TAG_GEOASCII and ascii_params is not None:
            keys[key] = ascii_params[value : value + n].rstrip("|\x00")
    return keys


def _geotransform(
    scale: list[float] | None, tiepoint: list[float] | None, matrix: list[float] | None
) -> list[float] | None:
    """GDAL geotransform (PixelIsArea convention) from the model tags, None if there is none."""
    if matrix is not None and len(matrix) >= 8:
        return [matrix[3], matrix[0], matrix[1], matrix[7], matrix[4], matrix[5]]
    if scale is not None and tiepoint is not None and len(scale) >= 2 and len(tiepoint) == 6:
        i, j, _k, x, y, _z = tiepoint
        sx, sy = scale[0], scale[1]
        return [x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy]
    return None


def _georef(page: Any) -> dict[str, Any] | None:
    """The georeference of a TIFF page (see :class:`TiffSource`), None without GeoTIFF tags."""
    raw = {code: _tag_value(page, code) for code in _GEO_TAG_NAMES}
    if all(v is None for v in raw.values()):
        return None
    geokeys = {_GEO_TAG_NAMES[code]: _jsonable(v) for code, v in raw.items() if v is not None}
    keys = _parse_geokeys(
        list(geokeys.get("GeoKeyDirectoryTag", [])),
        geokeys.get("GeoDoubleParamsTag"),
        geokeys.get("GeoAsciiParamsTag"),
    )
    transform = _geotransform(
        geokeys.get("ModelPixelScaleTag"),
        geokeys.get("ModelTiepointTag"),
        geokeys.get("ModelTransformationTag"),
    )
    point = keys.get(_KEY_RASTER_TYPE) == _RASTER_PIXEL_IS_POINT
    if transform is not None and point:
        # as GDAL does: the tags give pixel centres, the transform gives pixel corners
        transform[0] -= 0.5 * (transform[1] + transform[2])
        transform[3] -= 0.5 * (transform[4] + transform[5])
    epsg = None
    for key in (_KEY_PROJECTED_TYPE, _KEY_GEOGRAPHIC_TYPE):
        code = keys.get(key)
        if isinstance(code, int) and 0 < code < _USER_DEFINED:
            epsg = code
            break
    return {
        "transform": None if transform is None else [float(v) for v in transform],
        "crs_epsg": epsg,
        "pixel_is_point": point,
        "geokeys": geokeys,
    }


def _scale_georef(georef: dict[str, Any] | None, fy: float, fx: float) -> dict[str, Any] | None:
    """Georeference of an overview whose pixels are ``fy x fx`` full-resolution pixels."""
    if georef is None:
        return None
    out = dict(georef)
    out["geokeys"] = {
        k: v
        for k, v in georef["geokeys"].items()
        if k in ("GeoKeyDirectoryTag", "GeoDoubleParamsTag", "GeoAsciiParamsTag")
    }
    t = georef["transform"]
    if t is not None:
        out["transform"] = [t[0], t[1] * fx, t[2] * fy, t[3], t[4] * fx, t[5] * fy]
    return out


def geotiff_tags(
    georef: Mapping[str, Any] | None, scale: float = 1.0
) -> list[tuple[int, str, int, Any, bool]]:
    """GeoTIFF tags that place an output raster like the input, as tifffile ``extratags``.

    Parameters
    ----------
    georef : dict or None
        The ``georef`` of a :class:`TiffSource`.
    scale : float
        Size of an output pixel in input pixels (e.g. 4 for a score map at a quarter of the
        input resolution); the output covers the same area from the same top-left corner.

    Returns
    -------
    list of tuple
        ``(code, dtype, count, value, writeonce)`` items for
        ``tifffile.TiffWriter.write(extratags=...)``; empty when ``georef`` is None.

    Notes
    -----
    The raw model tags of the input are written back when present (pixel coordinates
    divided by ``scale``), otherwise they are rebuilt from ``transform``. Scaling is exact
    for PixelIsArea rasters; for PixelIsPoint rasters the origin moves by half a pixel.
    """
    if scale <= 0:
        raise ParameterError(f"scale must be > 0, got {scale}")
    if not georef:
        return []
    raw = dict(georef.get("geokeys") or {})
    tags: list[tuple[int, str, int, Any, bool]] = []
    pixel_scale = raw.get("ModelPixelScaleTag")
    tiepoint = raw.get("ModelTiepointTag")
    matrix = raw.get("ModelTransformationTag")
    transform = georef.get("transform")
    if pixel_scale is None and tiepoint is None and matrix is None and transform is not None:
        t = [float(v) for v in transform]
        if georef.get("pixel_is_point"):
            t[0] += 0.5 * (t[1] + t[2])
            t[3] += 0.5 * (t[4] + t[5])
        if t[2] == 0 and t[4] == 0:
            pixel_scale, tiepoint = [t[1], -t[5], 0.0], [0.0, 0.0, 0.0, t[0], t[3], 0.0]
        else:
            matrix = [t[1], t[2], 0.0, t[0], t[4], t[5], 0.0, t[3]] + [0.0] * 6 + [0.0, 1.0]
    if pixel_scale is not None:
        v = [float(x) for x in pixel_scale]
        v[0] *= scale
        v[1] *= scale
        tags.append((_TAG_PIXEL_SCALE, "d", len(v), tuple(v), True))
    if tiepoint is not None:
        v = [float(x) for x in tiepoint]
        for k in range(0, len(v) - 5, 6):
            v[k] /= scale
            v[k + 1] /= scale
        tags.append((_TAG_TIEPOINT, "d", len(v), tuple(v), True))
    if matrix is not None:
        v = [float(x) for x in matrix]
        for k in (0, 1, 4, 5, 8, 9):
            if k < len(v):
                v[k] *= scale
        tags.append((_TAG_TRANSFORMATION, "d", len(v), tuple(v), True))
    if raw.get("GeoKeyDirectoryTag") is not None:
        v = tuple(int(x) for x in raw["GeoKeyDirectoryTag"])
        tags.append((_TAG_GEOKEYS, "H", len(v), v, True))
    if raw.get("GeoDoubleParamsTag") is not None:
        v = tuple(float(x) for x in raw["GeoDoubleParamsTag"])
        tags.append((_TAG_GEODOUBLES, "d", len(v), v, True))
    if raw.get("GeoAsciiParamsTag") is not None:
        tags.append((_TAG_GEOASCII, "s", 0, str(raw["GeoAsciiParamsTag"]), True))
    return tags


# --------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------


class _CodecMissingError(ImageReadError):
    """The TIFF compression needs the optional ``imagecodecs`` package."""


def _open_binary(url: str, options: tuple) -> Any:
    """An open binary file object for a local path or fsspec URL."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(options))
        extra = (
            {}
            if isinstance(fs, LocalFileSystem)
            else {"block_size": _REMOTE_BLOCK_SIZE, "cache_type": "readahead"}
        )
        return fs.open(path, "rb", **extra)
    except FileNotFoundError as err:
        raise InputNotFoundError(f"{url!r} does not exist: check the path or URL") from err
    except (IsADirectoryError, NotADirectoryError) as err:
        raise ImageReadError(f"{url}: is not a file; pass the path of a TIFF file") from err
    except PermissionError as err:
        raise ImageReadError(
            f"{url}: permission denied ({err}); check file permissions or the credentials in storage_options"
        ) from err
    except (OSError, ValueError, TypeError, ImportError) as err:
        raise ImageReadError(
            f"{url}: cannot be opened ({type(err).__name__}: {err}); check the URL and storage_options"
        ) from err


def _normalise_axes(axes: str) -> str:
    """tifffile axes with the band axis as S (S, or C when there is no S) and others as Q."""
    band = "S" if "S" in axes else ("C" if "C" in axes else None)
    return "".join(a if a in "YX" else ("S" if a == band else "Q") for a in axes)


class _TiffHandle:
    """An open TIFF (file object, TiffFile, zarr view) and what was learnt opening it."""

    def __init__(self, url: str, options: tuple, series: int, level: int) -> None:
        import tifffile

        self.url = url
        fileobj = _open_binary(url, options)
        tif = None
        try:
            try:
                tif = self.tif = tifffile.TiffFile(fileobj, name=url)
                self._inspect(tif, series, level)
            except AnomalyDaskError:
                raise
            except Exception as err:  # tifffile raises many types on corrupt input
                raise ImageReadError(
                    f"{url}: not a readable TIFF file ({type(err).__name__}: {err}); it is "
                    f"corrupt, truncated or not a TIFF despite its extension - re-export or "
                    f"re-copy it, or remove it from the input"
                ) from err
            self._probe()
        except BaseException:
            _close_quietly(*(o for o in (tif, fileobj) if o is not None))
            raise
        weakref.finalize(self, _close_quietly, tif, fileobj)

    def _inspect(self, tif: Any, series: int, level: int) -> None:
        import zarr

        url = self.url
        if not tif.series:
            raise ImageReadError(f"{url}: the TIFF holds no image; re-export it")
        if not 0 <= series < len(tif.series):
            raise ImageReadError(f"{url}: has {len(tif.series)} image series, series={series} does not exist")
        base = tif.series[series]
        if not 0 <= level < len(base.levels):
            raise ImageReadError(
                f"{url}: series {series} has {len(base.levels)} resolution levels, "
                f"level={level} does not exist"
            )
        sel = base.levels[level]
        page = sel.pages[0] if len(sel.pages) else None
        if page is None:
            raise ImageReadError(f"{url}: the first page of the image is missing; the TIFF is corrupt")
        keyframe = sel.keyframe
        axes = _normalise_axes(sel.axes)
        shape = tuple(int(n) for n in sel.shape)
        if axes.count("Y") != 1 or axes.count("X") != 1:
            raise ImageReadError(f"{url}: unexpected TIFF layout (axes {sel.axes!r}, shape {shape})")
        self.axes = axes
        self.height = shape[axes.index("Y")]
        self.width = shape[axes.index("X")]
        self.notes: list[str] = []
        extra = [n for a, n in zip(axes, shape) if a == "Q" and n > 1]
        if extra:
            self.notes.append(
                f"{url}: holds {math.prod(extra)} images of {self.height} x {self.width} in its "
                f"first series (axes {sel.axes!r}); reading only the first"
            )

        photometric = int(keyframe.photometric)
        if photometric not in _PHOTOMETRIC_OK:
            raise ImageReadError(
                f"{url}: photometric interpretation {keyframe.photometric!r} is not supported; "
                f"convert the image to grayscale or RGB"
            )
        bands = shape[axes.index("S")] if "S" in axes else 1
        self.colormap: np.ndarray | None = None
        if sel.dtype is None:
            raise ImageReadError(
                f"{url}: {keyframe.bitspersample}-bit samples of format {keyframe.sampleformat!r} are "
                f"not supported; convert the image to 8, 16 or 32 bit"
            )
        if photometric == _PALETTE and bands == 1 and keyframe.colormap is not None:
            cmap = np.asarray(keyframe.colormap)
            if cmap.max() <= 255:
                cmap = cmap.astype(np.uint8)
            elif not np.any(cmap % 257):
                cmap = (cmap // 257).astype(np.uint8)
            else:
                cmap = cmap.astype(np.uint16)
            self.colormap = np.ascontiguousarray(cmap.T)  # (entries, 3)
            dtype = self.colormap.dtype
            self.file_channels, self.channels = 1, 3
        else:
            dtype = _check_dtype(sel.dtype, url)
            self.channels = _check_bands(bands, url)
            self.file_channels = self.channels
        self.dtype = dtype

        # truncation: every strip or tile of the page must lie inside the file
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) == 0 or len(offsets) != len(counts):
            raise ImageReadError(
                f"{url}: the TIFF lists no image data (missing strip/tile offsets); it is "
                f"truncated or corrupt - re-export or re-copy it"
            )
        end = max((int(o) + int(c) for o, c in zip(offsets, counts) if c), default=0)
        size = int(tif.filehandle.size)
        if end > size:
            raise ImageReadError(
                f"{url}: truncated TIFF: its image data runs to byte {end} but the file has only "
                f"{size} bytes; the copy or download was incomplete - copy the file again"
            )

        # uncompressed contiguous pixels are read row by row, never as one huge strip
        self.direct: tuple[int, np.dtype, int, bool] | None = None
        core = axes.replace("Q", "")
        if page is keyframe and keyframe.is_final and self.colormap is None and core in ("YX", "YXS", "SYX"):
            file_dtype = np.dtype(sel.dtype).newbyteorder(tif.byteorder)
            spp = shape[axes.index("S")] if "S" in axes else 1
            self.direct = (int(offsets[0]), file_dtype, spp, core == "SYX")
            tif.filehandle.set_lock(True)

        self.array = zarr.open_array(tif.aszarr(series=series, level=level), mode="r")
        if tuple(self.array.shape) != shape:
            raise ImageReadError(f"{url}: inconsistent TIFF layout (axes {sel.axes!r}, shape {shape})")

        self.nodata = _parse_nodata(_tag_value(keyframe, _TAG_GDAL_NODATA), url)
        first = base.levels[0]
        self.georef = _georef(first.keyframe)
        if level and self.georef is not None:
            full = first.shape
            f_axes = _normalise_axes(first.axes)
            fy = full[f_axes.index("Y")] / self.height
            fx = full[f_axes.index("X")] / self.width
            self.georef = _scale_georef(self.georef, fy, fx)

    def _probe(self) -> None:
        """Decode the first tile or strip, so that missing codecs fail on open."""
        try:
            self.read(0, min(1, self.height), 0, min(1, self.width))
        except AnomalyDaskError:
            raise
        except Exception as err:
            if "imagecodecs" in str(err):
                raise _CodecMissingError(
                    f"{self.url}: its compression needs the 'imagecodecs' package ({err}); "
                    f"install it (pip install imagecodecs) or re-save the TIFF with deflate/zlib "
                    f"compression or none"
                ) from err
            raise ImageReadError(
                f"{self.url}: its pixels cannot be decoded ({type(err).__name__}: {err}); the "
                f"file is corrupt or uses an unsupported compression - re-export it"
            ) from err

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.direct is not None:
            raw = self._read_direct(y0, y1, x0, x1)
        else:
            raw = _select(self.array, self.axes, y0, y1, x0, x1, self.file_channels)
        if self.colormap is not None:
            raw = self.colormap[np.minimum(raw[:, :, 0], len(self.colormap) - 1)]
        return raw

    # ---- uncompressed contiguous pixels ------------------------------------------------

    def _pread(self, offset: int, size: int) -> bytes:
        fh = self.tif.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise ImageReadError(
                f"{self.url}: truncated TIFF: {size} bytes expected at offset {offset}, got "
                f"{len(data)} - copy the file again"
            )
        return data

    def _read_rows(
        self, base: int, spp: int, dtype: np.dtype, y0: int, y1: int, x0: int, x1: int
    ) -> np.ndarray:
        h, w = y1 - y0, x1 - x0
        item = dtype.itemsize * spp
        rowbytes = self.width * item
        span = h * rowbytes
        if span <= max(4 * h * w * item, 1 << 20):
            buf = self._pread(base + y0 * rowbytes, span)
            return np.frombuffer(buf, dtype).reshape(h, self.width, spp)[:, x0:x1]
        out = np.empty((h, w, spp), dtype)
        view = out.reshape(h, w * spp).view(np.uint8)
        seg = w * item
        fh = self.tif.filehandle
        with fh.lock:
            for i, y in enumerate(range(y0, y1)):
                fh.seek(base + y * rowbytes + x0 * item)
                data = fh.read(seg)
                if len(data) != seg:
                    raise ImageReadError(f"{self.url}: truncated TIFF at row {y} - copy the file again")
                view[i] = np.frombuffer(data, np.uint8)
        return out

    def _read_direct(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        assert self.direct is not None
        offset, dtype, spp, separate = self.direct
        if y0 == y1 or x0 == x1:
            return np.empty((y1 - y0, x1 - x0, self.channels), self.dtype)
        if separate:
            plane = self.height * self.width * dtype.itemsize
            planes = [
                self._read_rows(offset + s * plane, 1, dtype, y0, y1, x0, x1) for s in range(self.channels)
            ]
            raw = np.concatenate(planes, axis=2)
        else:
            raw = self._read_rows(offset, spp, dtype, y0, y1, x0, x1)[:, :, : self.channels]
        return _native(raw)


def _tiff_handle(url: str, options: tuple, series: int, level: int) -> _TiffHandle:
    key = ("tiff", url, _options_token(options), series, level)
    return _TIFF_CACHE.get(key, lambda: _TiffHandle(url, options, series, level))


def _read_failed(name: str, err: Exception, y0: int, y1: int, x0: int, x1: int) -> ImageReadError:
    return ImageReadError(
        f"{name}: reading window y {y0}:{y1}, x {x0}:{x1} failed ({type(err).__name__}: {err}); "
        f"the file is corrupt, truncated or changed while in use - re-export or re-copy it"
    )


def _guarded_read(name: str, read: Callable[[int, int, int, int], np.ndarray], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Call ``read`` and turn any failure into an error naming the file and the window."""
    try:
        return read(y0, y1, x0, x1)
    except AnomalyDaskError:
        raise
    except FileNotFoundError as err:
        raise InputNotFoundError(f"{name!r} no longer exists") from err
    except Exception as err:
        raise _read_failed(name, err, y0, y1, x0, x1) from err


@dataclass(frozen=True)
class TiffSource(ImageSource):
    """A (Geo)TIFF image read tile by tile (or strip by strip) on demand.

    Create it with :meth:`open` (or :func:`open_raster`), which validates the file. The
    object holds no open file and pickles to a few hundred bytes; each process opens the
    file on its first :meth:`read` and keeps it open (see :func:`clear_cache`).

    Attributes
    ----------
    url : str
        Local path or fsspec URL.
    height, width : int
        Image size in pixels.
    channels : int
        1 (gray) or 3 (RGB). Files with 4 bands expose the first 3 (alpha is ignored);
        palette images expose the RGB colours of their colour map.
    dtype : numpy.dtype
        Pixel type (native byte order), one of :data:`RASTER_DTYPES`.
    nodata : float or None
        ``GDAL_NODATA`` tag value. NaN pixels of float rasters are no-data in any case.
    georef : dict or None
        JSON-able georeference, None for a plain TIFF: ``transform`` (GDAL geotransform
        ``[x0, pixel_width, 0, y0, 0, -pixel_height]`` of the top-left pixel corner, or None
        when the file has only ground control points), ``crs_epsg`` (int or None),
        ``pixel_is_point`` (bool) and ``geokeys``, the raw GeoTIFF tags by name
        (``GeoKeyDirectoryTag``, ``GeoDoubleParamsTag``, ``GeoAsciiParamsTag``,
        ``ModelPixelScaleTag``, ``ModelTiepointTag``, ``ModelTransformationTag``; those
        present) to write into outputs with :func:`geotiff_tags`. Do not mutate it.
    storage_options : tuple
        fsspec options as sorted ``(key, value)`` items.
    series, level : int
        The tifffile image series and pyramid level read (default: the first series at full
        resolution). Further images of a multi-page series are ignored (with a warning).
    axes : str
        Layout of the series: ``Y``, ``X``, ``S`` (bands) and ``Q`` (read at index 0).

    Notes
    -----
    Photometric MINISWHITE images are returned as stored (not inverted). Compressions other
    than deflate/zlib, packbits and none need the ``imagecodecs`` package.
    """

    url: str
    height: int
    width: int
    channels: int
    dtype: np.dtype
    nodata: float | None = None
    georef: dict[str, Any] | None = field(default=None, repr=False, hash=False)
    storage_options: tuple = field(default=(), repr=False, hash=False)
    series: int = 0
    level: int = 0
    axes: str = "YX"

    @property
    def name(self) -> str:
        """The URL, used in messages and output names."""
        return self.url

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        series: int = 0,
        level: int = 0,
    ) -> TiffSource:
        """Open and validate a TIFF file, reading only its header and first tile.

        Parameters
        ----------
        url : str
            Local path or fsspec URL of a TIFF or BigTIFF file, tiled or striped.
        storage_options : dict, optional
            Passed to fsspec (credentials, endpoint, ...).
        series, level : int
            Image series and pyramid level to read.

        Returns
        -------
        TiffSource

        Raises
        ------
        InputNotFoundError
            The file does not exist.
        ImageReadError
            Not a TIFF, truncated, undecodable (e.g. a compression that needs
            ``imagecodecs``), or with an unsupported pixel type or band count.
        """
        url = str(url)
        items = _options_items(storage_options)
        handle = _tiff_handle(url, items, series, level)
        for note in handle.notes:
            warnings.warn(note, stacklevel=2)
        return cls(
            url,
            handle.height,
            handle.width,
            handle.channels,
            handle.dtype,
            handle.nodata,
            handle.georef,
            items,
            series,
            level,
            handle.axes,
        )

    def _handle(self) -> _TiffHandle:
        handle = _tiff_handle(self.url, self.storage_options, self.series, self.level)
        if (handle.height, handle.width, handle.channels, handle.axes) != (
            self.height,
            self.width,
            self.channels,
            self.axes,
        ):
            raise ImageReadError(
                f"{self.url}: the file changed since it was opened (now {handle.height} x "
                f"{handle.width} x {handle.channels}, was {self.height} x {self.width} x "
                f"{self.channels}); open it again"
            )
        return handle

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw pixels of ``[y0, y1) x [x0, x1)``, reading only the tiles/strips it touches.

        Returns
        -------
        numpy.ndarray
            ``(y1 - y0, x1 - x0, channels)`` array of :attr:`dtype`.

        Raises
        ------
        ParameterError
            The window is not inside the image.
        InputNotFoundError, ImageReadError
            The file vanished, or its data cannot be read or decoded.
        """
        _check_window(self, y0, y1, x0, x1)
        if y0 == y1 or x0 == x1:
            return np.empty((y1 - y0, x1 - x0, self.channels), self.dtype)
        return _guarded_read(self.url, self._handle().read, y0, y1, x0, x1)


# --------------------------------------------------------------------------------------
# zarr
# --------------------------------------------------------------------------------------


def _zarr_kwargs(url: str, options: tuple) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"mode": "r"}
    if options and "://" in url:
        kwargs["storage_options"] = dict(options)
    return kwargs


def _dimension_names(array: Any) -> list[str] | None:
    names = getattr(array.metadata, "dimension_names", None)
    if not names:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if not names or len(names) != array.ndim:
        return None
    return [str(n) if n is not None else "" for n in names]


def _zarr_axes(shape: tuple[int, ...], names: list[str] | None, name: str) -> str:
    """Normalised axes (Y, X, S, Q) of a zarr array, from dimension names or its shape."""
    if names is not None:
        lower = [n.lower() for n in names]
        axes = "".join(
            "Y" if n in _Y_NAMES else "X" if n in _X_NAMES else "S" if n in _BAND_NAMES else "Q"
            for n in lower
        )
        if axes.count("Y") == 1 and axes.count("X") == 1 and axes.count("S") <= 1:
            return axes
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        if shape[2] > 4 and shape[0] <= 4:
            return "SYX"  # band-first (C, H, W)
        return "YXS"
    raise ImageReadError(
        f"{name}: zarr array of shape {shape} is not an image; expected (H, W) or (H, W, C) "
        f"(or dimension names such as y, x, band)"
    )


def _resolve_zarr_array(node: Any, url: str) -> tuple[str, list[str] | None]:
    """The array path inside a group (and OME-NGFF axis names), or ImageReadError."""
    attrs = node.attrs.asdict()
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        ms = multiscales[0]
        path = str(ms["datasets"][0]["path"])
        axes = ms.get("axes")
        names = [a["name"] if isinstance(a, Mapping) else str(a) for a in axes] if axes else None
        return path, names
    arrays = sorted(node.array_keys())
    if "image" in arrays:
        return "image", None
    if len(arrays) == 1:
        return arrays[0], None
    listed = ", ".join(arrays) if arrays else "none"
    raise ImageReadError(
        f"{url}: is a zarr group, not an array, and holds no array named 'image' (arrays: "
        f"{listed}); pass the array's URL, e.g. '{url.rstrip('/')}/<array>'"
    )


class _ZarrHandle:
    """An open zarr array and what was learnt opening it."""

    def __init__(self, url: str, options: tuple, path: str | None) -> None:
        import zarr

        self.url = url
        label = url if not path else f"{url.rstrip('/')}/{path}"
        try:
            fs, fpath = fsspec.core.url_to_fs(url, **dict(options))
            exists = fs.exists(fpath)
        except Exception as err:
            raise ImageReadError(
                f"{url}: cannot be opened ({type(err).__name__}: {err}); check the URL and storage_options"
            ) from err
        if not exists:
            raise InputNotFoundError(f"{url!r} does not exist: check the path or URL")
        names: list[str] | None = None
        try:
            node = zarr.open(store=url, **_zarr_kwargs(url, options))
            if path is None:
                if isinstance(node, zarr.Group):
                    path, names = _resolve_zarr_array(node, url)
                else:
                    path = ""
            array = node if path == "" else node[path]
        except AnomalyDaskError:
            raise
        except Exception as err:
            raise ImageReadError(
                f"{label}: not a readable zarr array ({type(err).__name__}: {err}); pass a zarr "
                f"array (or a group with an array named 'image') written with zarr format 2 or 3"
            ) from err
        if not isinstance(array, zarr.Array):
            raise ImageReadError(f"{label}: is a zarr group, not an array; pass the array's URL")
        self.path = path
        self.label = f"{url.rstrip('/')}/{path}" if path else url
        self.array = array
        if names is None:
            names = _dimension_names(array)
        shape = tuple(int(n) for n in array.shape)
        self.axes = _zarr_axes(shape, names, self.label)
        self.height = shape[self.axes.index("Y")]
        self.width = shape[self.axes.index("X")]
        bands = shape[self.axes.index("S")] if "S" in self.axes else 1
        self.channels = _check_bands(bands, self.label)
        self.dtype = _check_dtype(array.dtype, self.label)
        attrs = array.attrs.asdict()
        value = next((attrs[k] for k in ("nodata", "_FillValue", "missing_value") if k in attrs), None)
        self.nodata = _parse_nodata(value, self.label)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return _select(self.array, self.axes, y0, y1, x0, x1, self.channels)


def _zarr_handle(url: str, options: tuple, path: str | None) -> _ZarrHandle:
    key = ("zarr", url, _options_token(options), path)
    return _ZARR_CACHE.get(key, lambda: _ZarrHandle(url, options, path))


@dataclass(frozen=True)
class ZarrSource(ImageSource):
    """A zarr array (format 2 or 3) read chunk by chunk on demand.

    Create it with :meth:`open` (or :func:`open_raster`). Like :class:`TiffSource`, it holds
    no open store and is cheap to pickle.

    Attributes
    ----------
    url : str
        Local path or fsspec URL of the array, or of a group holding it.
    path : str
        Path of the array inside ``url`` ("" when ``url`` is the array).
    height, width, channels : int
        Image shape; channels 1 or 3 (the first 3 of 4 bands).
    dtype : numpy.dtype
        Pixel type, one of :data:`RASTER_DTYPES`.
    nodata : float or None
        From the array attribute ``nodata``, ``_FillValue`` or ``missing_value`` (the zarr
        ``fill_value`` is not used). NaN pixels of float arrays are no-data in any case.
    georef : None
        Zarr arrays carry no georeference here.
    storage_options : tuple
        fsspec options as sorted ``(key, value)`` items.
    axes : str
        Layout: ``Y``, ``X``, optional ``S`` (bands) and ``Q`` (other axes, read at index 0).
        Taken from the dimension names (zarr 3 ``dimension_names``, xarray's
        ``_ARRAY_DIMENSIONS`` or OME-NGFF axes) when they name y and x, otherwise (H, W) or
        (H, W, C), or (C, H, W) when the first axis is short and the last long.
    """

    url: str
    height: int
    width: int
    channels: int
    dtype: np.dtype
    nodata: float | None = None
    georef: dict[str, Any] | None = field(default=None, repr=False, hash=False)
    storage_options: tuple = field(default=(), repr=False, hash=False)
    path: str = ""
    axes: str = "YX"

    @property
    def name(self) -> str:
        """``url`` joined with ``path``, used in messages and output names."""
        return f"{self.url.rstrip('/')}/{self.path}" if self.path else self.url

    @classmethod
    def open(
        cls, url: str, storage_options: Mapping[str, Any] | None = None, *, path: str | None = None
    ) -> ZarrSource:
        """Open and validate a zarr array (reads metadata only).

        Parameters
        ----------
        url : str
            Local path or fsspec URL of a zarr array or group (``store.zarr``,
            ``store.zarr/image``, ``s3://bucket/store.zarr``).
        storage_options : dict, optional
            Passed to fsspec.
        path : str, optional
            Array path inside ``url``. Default: ``url`` itself if it is an array; in a group,
            the array ``image``, level 0 of an OME-NGFF multiscale image, or the only array.

        Returns
        -------
        ZarrSource

        Raises
        ------
        InputNotFoundError
            Nothing exists at ``url``.
        ImageReadError
            Not a zarr array, an ambiguous group, or an unsupported shape or pixel type.
        """
        url = str(url)
        items = _options_items(storage_options)
        handle = _zarr_handle(url, items, path)
        return cls(
            url,
            handle.height,
            handle.width,
            handle.channels,
            handle.dtype,
            handle.nodata,
            None,
            items,
            handle.path,
            handle.axes,
        )

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw pixels of ``[y0, y1) x [x0, x1)``, reading only the chunks it touches.

        Returns
        -------
        numpy.ndarray
            ``(y1 - y0, x1 - x0, channels)`` array of :attr:`dtype`.

        Raises
        ------
        ParameterError
            The window is not inside the image.
        InputNotFoundError, ImageReadError
            The array vanished, changed, or its chunks cannot be read.
        """
        _check_window(self, y0, y1, x0, x1)
        if y0 == y1 or x0 == x1:
            return np.empty((y1 - y0, x1 - x0, self.channels), self.dtype)
        handle = _zarr_handle(self.url, self.storage_options, self.path)
        if (handle.height, handle.width, handle.channels, handle.axes) != (
            self.height,
            self.width,
            self.channels,
            self.axes,
        ):
            raise ImageReadError(f"{self.name}: the array changed since it was opened; open it again")
        return _guarded_read(self.name, handle.read, y0, y1, x0, x1)


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def _is_zarr_path(path: str) -> bool:
    return any(part.endswith(ZARR_EXTENSIONS) for part in path.replace("\\", "/").split("/"))


def is_raster(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether :func:`open_raster` reads ``url`` (a TIFF file or a zarr store).

    Decided from the name (``.tif``, ``.tiff``; a ``.zarr`` path component); a name
    without a known extension is looked up for zarr metadata (``zarr.json``, ``.zarray``,
    ``.zgroup``), which costs a request or two for remote URLs.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    storage_options : dict, optional
        Passed to fsspec for the look-up.

    Returns
    -------
    bool
    """
    path = _url_path(str(url))
    if path.endswith(TIFF_EXTENSIONS) or _is_zarr_path(path):
        return True
    if path.endswith(_PILLOW_EXTENSIONS):
        return False
    try:
        fs, fpath = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        if not fs.isdir(fpath):
            return False
        return any(fs.exists(f"{fpath.rstrip('/')}/{marker}") for marker in _ZARR_MARKERS)
    except Exception:  # noqa: BLE001 - an unreachable URL is simply not a raster
        return False


def open_raster(url: str, storage_options: Mapping[str, Any] | None = None) -> TiffSource | ZarrSource | None:
    """Open a TIFF file or zarr array lazily, or return None for other images.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    storage_options : dict, optional
        Passed to fsspec.

    Returns
    -------
    TiffSource, ZarrSource or None
        None when :func:`is_raster` is False (PNG, JPEG, ...), and for a TIFF whose
        compression (LZW, JPEG, ...) needs the missing ``imagecodecs`` package, with a
        warning: the caller then decodes the image whole with Pillow.

    Raises
    ------
    InputNotFoundError
        ``url`` does not exist.
    ImageReadError
        A TIFF or zarr input that cannot be used; the message says why and what to do.
    """
    url = str(url)
    if not is_raster(url, storage_options):
        return None
    if _url_path(url).endswith(TIFF_EXTENSIONS):
        try:
            return TiffSource.open(url, storage_options)
        except _CodecMissingError as err:
            warnings.warn(
                f"{err}; decoding the whole image with Pillow instead, which needs it to fit in memory",
                stacklevel=2,
            )
            return None
    return ZarrSource.open(url, storage_options)
