"""zarr arrays (formats 2 and 3) read chunk by chunk on demand.

A :class:`ZarrSource`, like a :class:`~anomaly_dask.io.tiff.TiffSource`, is a small
picklable description; each process opens the store on its first read and keeps it in a
per-process cache (:func:`~anomaly_dask.io.base.clear_cache` empties it). The layout (which
axes are rows, columns and bands) comes from the dimension names when they say, otherwise
from the shape.

No-data is the array attribute ``nodata``, ``_FillValue`` or ``missing_value``, None when
absent; NaN pixels of float arrays are no-data in any case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from ..errors import AnomalyDaskError, ImageReadError, InputNotFoundError
from .base import (
    HandleCache,
    ImageSource,
    check_bands,
    check_dtype,
    check_window,
    guarded_read,
    header,
    options_items,
    options_token,
    parse_nodata,
    select,
)

__all__ = ["ZARR_EXTENSIONS", "ZARR_MARKERS", "ZarrSource"]

ZARR_EXTENSIONS = (".zarr",)
#: Files that make a folder a zarr array or group.
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")

_CACHE = HandleCache(32)  # open stores kept per process

# dimension names understood as rows, columns and bands
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
        self.channels = check_bands(bands, self.label)
        self.dtype = check_dtype(array.dtype, self.label)
        attrs = array.attrs.asdict()
        value = next((attrs[k] for k in ("nodata", "_FillValue", "missing_value") if k in attrs), None)
        self.nodata = parse_nodata(value, self.label)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return select(self.array, self.axes, y0, y1, x0, x1, self.channels)


def _zarr_handle(url: str, options: tuple, path: str | None) -> _ZarrHandle:
    key = ("zarr", url, options_token(options), path)
    return _CACHE.get(key, lambda: _ZarrHandle(url, options, path))


@dataclass(frozen=True)
class ZarrSource(ImageSource):
    """A zarr array (format 2 or 3) read chunk by chunk on demand.

    Create it with :meth:`open` (or :func:`~anomaly_dask.io.open_raster`). Like a TIFF source, it holds
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
        Pixel type, one of :data:`~anomaly_dask.io.base.RASTER_DTYPES`.
    nodata : float or None
        From the array attribute ``nodata``, ``_FillValue`` or ``missing_value`` (the zarr
        ``fill_value`` is not used). NaN pixels of float arrays are no-data in any case.
    georef : None
        zarr inputs carry no georeference.
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
    georef: None = field(default=None, repr=False, hash=False)
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
        items = options_items(storage_options)
        handle = _zarr_handle(url, items, path)
        return cls(url, **header(handle), storage_options=items, path=handle.path, axes=handle.axes)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw pixels of ``[y0, y1) x [x0, x1)`` as :meth:`ImageSource.read
        <anomaly_dask.io.base.ImageSource.read>` gives them, reading only the chunks the
        window touches; :class:`InputNotFoundError` or :class:`ImageReadError` when the
        array vanished, changed, or its chunks cannot be read."""
        check_window(self, y0, y1, x0, x1)
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
        return guarded_read(self.name, handle.read, y0, y1, x0, x1)
