"""TIFF, BigTIFF and GeoTIFF files read tile by tile (or strip by strip) on demand.

A :class:`TiffSource` is a small, frozen, picklable description of one huge image (its URL,
shape, dtype, no-data value and georeference). Nothing that holds an open file lives in it:
:meth:`TiffSource.read` opens the file the first time a process needs it, keeps it open in a
per-process cache (:func:`~anomaly_dask.io.base.clear_cache` empties it), and reads only the
tiles or strips that intersect the requested window. A Dask task therefore ships a few
hundred bytes and reads only its own window, whatever the size of the image.

Files are read with ``tifffile`` through a file object from ``fsspec``, so local paths and
any fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``, ...) work. The
georeference is decoded by :mod:`anomaly_dask.georef` from the header already read.

No-data is the value of the ``GDAL_NODATA`` TIFF tag, None when absent. NaN is always
no-data in float rasters whatever ``nodata`` says: it is not reported separately.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ..errors import AnomalyDaskError, ImageReadError, InputNotFoundError
from ..georef import Georef, georef_from_page, scale_georef
from .base import (
    HandleCache,
    ImageSource,
    check_bands,
    check_dtype,
    check_window,
    close_quietly,
    guarded_read,
    header,
    native,
    options_items,
    options_token,
    parse_nodata,
    select,
)

__all__ = ["TIFF_EXTENSIONS", "CodecMissingError", "TiffSource"]

TIFF_EXTENSIONS = (".tif", ".tiff")

_REMOTE_BLOCK_SIZE = 256 * 1024  # read-ahead of remote files (s3fs defaults to many MiB)
_CACHE = HandleCache(32)  # open files kept per process

# TIFF photometric interpretations that can be read as gray or RGB pixels
_PHOTOMETRIC_OK = {0: "MINISWHITE", 1: "MINISBLACK", 2: "RGB", 3: "PALETTE", 6: "YCBCR"}
_PALETTE = 3
_TAG_GDAL_NODATA = 42113


class CodecMissingError(ImageReadError):
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
        self.level = level
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
            close_quietly(*(o for o in (tif, fileobj) if o is not None))
            raise
        weakref.finalize(self, close_quietly, tif, fileobj)

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
            dtype = check_dtype(sel.dtype, url)
            self.channels = check_bands(bands, url)
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

        nodata = keyframe.tags.get(_TAG_GDAL_NODATA)
        self.nodata = parse_nodata(None if nodata is None else nodata.value, url)
        # the georeference is that of full resolution, decoded only when asked for
        first = base.levels[0]
        self._geo_page = first.keyframe
        f_axes = _normalise_axes(first.axes)
        self._geo_scale = (
            first.shape[f_axes.index("Y")] / self.height,
            first.shape[f_axes.index("X")] / self.width,
        )

    @cached_property
    def georef(self) -> Georef | None:
        """Georeference of the level read (None for a plain TIFF), decoded on first use."""
        georef = georef_from_page(self._geo_page, self.url)
        if self.level and georef is not None:
            georef = scale_georef(georef, *self._geo_scale)
        return georef

    def _probe(self) -> None:
        """Decode the first tile or strip, so that missing codecs fail on open."""
        try:
            self.read(0, min(1, self.height), 0, min(1, self.width))
        except AnomalyDaskError:
            raise
        except Exception as err:
            if "imagecodecs" in str(err):
                raise CodecMissingError(
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
            raw = select(self.array, self.axes, y0, y1, x0, x1, self.file_channels)
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
        return native(raw)


def _tiff_handle(url: str, options: tuple, series: int, level: int) -> _TiffHandle:
    key = ("tiff", url, options_token(options), series, level)
    return _CACHE.get(key, lambda: _TiffHandle(url, options, series, level))



@dataclass(frozen=True)
class TiffSource(ImageSource):
    """A (Geo)TIFF image read tile by tile (or strip by strip) on demand.

    Create it with :meth:`open` (or :func:`~anomaly_dask.io.open_raster`), which validates the file. The
    object holds no open file and pickles to a few hundred bytes; each process opens the
    file on its first :meth:`read` and keeps it open (see
    :func:`~anomaly_dask.io.base.clear_cache`).

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
        Pixel type (native byte order), one of :data:`~anomaly_dask.io.base.RASTER_DTYPES`.
    nodata : float or None
        ``GDAL_NODATA`` tag value. NaN pixels of float rasters are no-data in any case.
    georef : Georef or None
        Where the image lies (:class:`anomaly_dask.georef.Georef`: CRS and GDAL
        geotransform of the top-left pixel corner, scaled to the level read), None for a
        plain TIFF. Do not mutate it.
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
    georef: Georef | None = field(default=None, repr=False, hash=False)
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
        items = options_items(storage_options)
        handle = _tiff_handle(url, items, series, level)
        for note in handle.notes:
            warnings.warn(note, stacklevel=2)
        return cls(
            url, **header(handle), georef=handle.georef, storage_options=items, series=series, level=level,
            axes=handle.axes,
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
        check_window(self, y0, y1, x0, x1)
        if y0 == y1 or x0 == x1:
            return np.empty((y1 - y0, x1 - x0, self.channels), self.dtype)
        return guarded_read(self.url, self._handle().read, y0, y1, x0, x1)

