"""What every image reader shares: the source interface, in-memory arrays, option freezing,
the per-process cache of open files, window checks and the no-data test.

This module imports no reader. The readers (:mod:`~anomaly_dask.io.pillow`,
:mod:`~anomaly_dask.io.tiff`, :mod:`~anomaly_dask.io.zarr_source`) build on it, and
:mod:`~anomaly_dask.io.dispatch` picks among them.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AnomalyDaskError, ImageReadError, InputNotFoundError, ParameterError

if TYPE_CHECKING:
    from ..georef import Georef

__all__ = [
    "header",
    "RASTER_DTYPES",
    "ArraySource",
    "ImageSource",
    "check_array",
    "clear_cache",
    "freeze_options",
    "read_window",
    "thaw_options",
    "valid_pixels",
]

#: Pixel types a raster may have (native byte order); anything else is refused on open.
RASTER_DTYPES = tuple(
    np.dtype(t) for t in ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
)


# --------------------------------------------------------------------------------------
# The source interface
# --------------------------------------------------------------------------------------


class ImageSource:
    """One image, read window by window.

    Attributes
    ----------
    name : str
        Path or label used in messages and output names.
    height, width, channels : int
        Shape of the raw pixels ``(height, width, channels)``, channels 1 or 3.
    dtype : numpy.dtype
        Raw pixel type.
    nodata : float or None
        Raw value that marks pixels without data, None when there is none. NaN pixels of
        float images are no-data in any case.
    georef : Georef or None
        Where the image lies on the ground (:mod:`anomaly_dask.georef`), None when unknown.
    """

    name: str
    height: int
    width: int
    channels: int
    dtype: np.dtype
    nodata: float | None = None
    georef: Georef | None = None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw pixels of ``[y0, y1) x [x0, x1)`` (inside the image).

        Returns
        -------
        numpy.ndarray
            ``(y1 - y0, x1 - x0, channels)`` array of :attr:`dtype`.
        """
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class ArraySource(ImageSource):
    """An in-memory numpy array of shape ``(H, W, C)``, C in 1 or 3 (see :func:`check_array`)."""

    array: np.ndarray
    name: str = "<array>"

    @property
    def height(self) -> int:  # type: ignore[override]
        return self.array.shape[0]

    @property
    def width(self) -> int:  # type: ignore[override]
        return self.array.shape[1]

    @property
    def channels(self) -> int:  # type: ignore[override]
        return self.array.shape[2]

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return self.array.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.array[y0:y1, x0:x1]


def check_array(arr: np.ndarray, name: str) -> np.ndarray:
    """An image array as ``(H, W, 1 or 3)``, or ImageReadError saying what is wrong.

    Parameters
    ----------
    arr : numpy.ndarray
        ``(H, W)`` or ``(H, W, C)`` with C in 1, 3 or 4 (alpha dropped); integer or float.
    name : str
        Label used in messages.

    Returns
    -------
    numpy.ndarray
        A view of ``arr`` with three axes.
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageReadError(f"{name}: expected an array of shape (H, W) or (H, W, C), got {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.shape[2] not in (1, 3):
        raise ImageReadError(
            f"{name}: {arr.shape[2]} channels are not supported; pass 1 (gray), 3 (RGB) or 4 (RGBA)"
        )
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == bool or not numeric:
        raise ImageReadError(
            f"{name}: pixel dtype {arr.dtype} is not supported; use unsigned/signed integers or floats"
        )
    return arr


# --------------------------------------------------------------------------------------
# Storage options as hashable values
# --------------------------------------------------------------------------------------


class _FrozenDict(tuple):
    """A dict frozen by :func:`freeze_options` (sorted ``(key, value)`` items)."""


class _FrozenList(tuple):
    """A list frozen by :func:`freeze_options`."""


def freeze_options(value: Any) -> Any:
    """Storage options as a hashable value (nested dicts and lists become tuples).

    Parameters
    ----------
    value : Any
        A dict of fsspec options (values may be dicts or lists, e.g. ``client_kwargs``).

    Returns
    -------
    Any
        Hashable and picklable; :func:`thaw_options` gives the original back.
    """
    if isinstance(value, dict):
        return _FrozenDict(sorted((str(k), freeze_options(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)) and not isinstance(value, (_FrozenDict, _FrozenList)):
        return _FrozenList(freeze_options(v) for v in value)
    return value


def thaw_options(value: Any) -> Any:
    """The inverse of :func:`freeze_options`.

    Parameters
    ----------
    value : Any
        What :func:`freeze_options` returned.

    Returns
    -------
    Any
        The original dicts and lists.
    """
    if isinstance(value, _FrozenDict):
        return {k: thaw_options(v) for k, v in value}
    if isinstance(value, _FrozenList):
        return [thaw_options(v) for v in value]
    return value


def header(handle: Any) -> dict[str, Any]:
    """The size, bands, pixel type and no-data value of an opened reader handle, as the
    keyword arguments of an :class:`ImageSource` (``height``, ``width``, ``channels``,
    ``dtype``, ``nodata``)."""
    return {k: getattr(handle, k) for k in ("height", "width", "channels", "dtype", "nodata")}


def options_items(storage_options: Mapping[str, Any] | None) -> tuple:
    """Storage options as a sorted tuple of ``(key, value)`` items (a raster source's field)."""
    return tuple(sorted((storage_options or {}).items()))


def options_token(items: tuple) -> str:
    """A hashable cache key for option items whose values may be unhashable (dicts)."""
    return repr(items)


# --------------------------------------------------------------------------------------
# Per-process cache of open files
# --------------------------------------------------------------------------------------

_CACHES: weakref.WeakSet[HandleCache] = weakref.WeakSet()


class HandleCache:
    """Least-recently-used map of open readers, private to each process.

    Keys include the process id, so a child forked from a process that already had a file
    open opens its own (a shared file offset would interleave the reads of both). Readers
    are opened outside the lock; when two threads open the same file at once, one copy is
    kept. An evicted reader is closed when the last thread using it lets it go. Every cache
    is emptied by :func:`clear_cache`.

    Parameters
    ----------
    maxsize : int
        Most readers kept open.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        _CACHES.add(self)

    def get(self, key: tuple, factory: Callable[[], Any]) -> Any:
        """The reader cached under ``key``, opened with ``factory()`` when absent."""
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
        """Forget every reader (each closes once no read is using it)."""
        with self._lock:
            self._items.clear()


def clear_cache() -> None:
    """Forget the files this process holds open (they close once no read is using them).

    Later reads reopen them, as a fresh worker process would.
    """
    for cache in list(_CACHES):
        cache.clear()


def close_quietly(*objects: Any) -> None:
    """Close each object, ignoring errors (used while unwinding and at garbage collection)."""
    for obj in objects:
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - closing during garbage collection must not raise
            pass


# --------------------------------------------------------------------------------------
# Checks and helpers of the raster readers
# --------------------------------------------------------------------------------------


def url_path(url: str) -> str:
    """The path part of a URL or local path, without query and trailing slashes, lower-case."""
    path = url.split("?", 1)[0] if "://" in url else url
    return path.rstrip("/\\").lower()


def check_window(source: ImageSource, y0: int, y1: int, x0: int, x1: int) -> None:
    """ParameterError unless ``[y0, y1) x [x0, x1)`` lies inside ``source``."""
    if not (0 <= y0 <= y1 <= source.height and 0 <= x0 <= x1 <= source.width):
        raise ParameterError(
            f"{source.name}: window y {y0}:{y1}, x {x0}:{x1} is not inside the image "
            f"({source.height} x {source.width} pixels); use read_window to pad outside windows"
        )


def check_dtype(dtype: np.dtype, name: str) -> np.dtype:
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


def check_bands(bands: int, name: str) -> int:
    """Channels exposed for ``bands`` bands in the file: 1, 3, or 3 of 4."""
    if bands in (1, 3):
        return bands
    if bands == 4:
        return 3
    raise ImageReadError(
        f"{name}: {bands} bands are not supported; the image must have 1 (gray), 3 (RGB) or "
        f"4 (RGBA, alpha ignored) bands - extract the bands to use (e.g. gdal_translate -b 1)"
    )


def native(a: np.ndarray) -> np.ndarray:
    """``a`` in native byte order and C-contiguous."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def select(array: Any, axes: str, y0: int, y1: int, x0: int, x1: int, channels: int) -> np.ndarray:
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
    return native(out)


def parse_nodata(value: Any, name: str) -> float | None:
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


def guarded_read(
    name: str, read: Callable[[int, int, int, int], np.ndarray], y0: int, y1: int, x0: int, x1: int
) -> np.ndarray:
    """Call ``read`` and turn any failure into an error naming the file and the window."""
    try:
        return read(y0, y1, x0, x1)
    except AnomalyDaskError:
        raise
    except FileNotFoundError as err:
        raise InputNotFoundError(f"{name!r} no longer exists") from err
    except Exception as err:
        raise ImageReadError(
            f"{name}: reading window y {y0}:{y1}, x {x0}:{x1} failed ({type(err).__name__}: {err}); "
            f"the file is corrupt, truncated or changed while in use - re-export or re-copy it"
        ) from err


# --------------------------------------------------------------------------------------
# Windows and no-data
# --------------------------------------------------------------------------------------


def read_window(source: ImageSource, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Raw pixels of any rectangle; parts outside the image are mirrored in (reflect).

    Parameters
    ----------
    source : ImageSource
        The image.
    y0, y1, x0, x1 : int
        The rectangle ``[y0, y1) x [x0, x1)``, which may reach outside the image.

    Returns
    -------
    numpy.ndarray
        ``(y1 - y0, x1 - x0, channels)`` raw pixels.
    """
    cy0, cy1 = max(0, y0), min(source.height, y1)
    cx0, cx1 = max(0, x0), min(source.width, x1)
    raw = source.read(cy0, cy1, cx0, cx1)
    pad = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
    if any(p for axis in pad for p in axis):
        raw = np.pad(raw, pad, mode="reflect")
    return raw


def valid_pixels(raw: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Pixels that hold data: not NaN (floats) and not ``nodata`` in every band.

    Parameters
    ----------
    raw : numpy.ndarray
        ``(h, w, bands)`` raw pixels.
    nodata : float or None
        The no-data value, if any.

    Returns
    -------
    numpy.ndarray of bool or None
        ``(h, w)``, or None when every pixel is valid (the common case, cheap).
    """
    invalid = None
    if np.issubdtype(raw.dtype, np.floating):
        invalid = np.isnan(raw).any(axis=2)
    if nodata is not None and not np.isnan(nodata):
        hit = (raw == np.asarray(nodata).astype(raw.dtype)).all(axis=2)
        invalid = hit if invalid is None else invalid | hit
    if invalid is None or not invalid.any():
        return None
    return ~invalid
