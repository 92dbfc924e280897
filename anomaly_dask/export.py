"""Exporters of a finished output store: PNG tiles, a quick-look PNG and GeoTIFFs.

Each streams: it reads the store's zarr arrays (:class:`~anomaly_dask.store.OutputStore`)
a few chunks at a time and never holds a whole array, so it works for images of any size.
GeoTIFFs are written by ``rasterio`` (GDAL), placed with a
:class:`~anomaly_dask.georef.Georef`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import numpy as np
import zarr

from .errors import OutputLocationError, ParameterError
from .georef import to_rasterio
from .locations import beside, is_local, join, normalize_url, publish
from .outputs import write_png
from .store import ARRAY_NAMES, OutputStore

if TYPE_CHECKING:
    from affine import Affine
    from rasterio.crs import CRS

__all__ = ["write_geotiff", "write_png_tiles", "write_quicklook"]

_BIGTIFF_BYTES = 2**31  # uncompressed size above which write_geotiff writes a BigTIFF

#: GDAL names of the compressions write_geotiff takes (tifffile's names, as before).
_COMPRESSION = {
    "zlib": "DEFLATE",
    "deflate": "DEFLATE",
    "adobe_deflate": "DEFLATE",
    "lzw": "LZW",
    "zstd": "ZSTD",
    "lzma": "LZMA",
    "packbits": "PACKBITS",
    "webp": "WEBP",
    "jpeg": "JPEG",
    "lerc": "LERC",
    "none": None,
}

#: Band descriptions written into GeoTIFFs, per array.
BAND_DESCRIPTIONS = {
    "mask": ("anomaly mask (1 anomalous, 0 normal, 255 no data)",),
    "score": ("anomaly score, calibrated: -log10 of the share of normal pixels as high (NaN no data)",),
    "overlay": ("red", "green", "blue"),
}

#: Values of ``mask.tif``: the store's 0 / 255 mask becomes 0 / 1, no data 255.
MASK_NORMAL, MASK_ANOMALOUS, MASK_NODATA = 0, 1, 255

#: How the overviews of a Cloud-Optimized GeoTIFF are computed, per array.
_OVERVIEW_RESAMPLING = {"mask": "NEAREST", "score": "AVERAGE", "overlay": "AVERAGE"}


# --------------------------------------------------------------------------------------------
# PNG


def _check_uint8(name: str, what: str) -> None:
    if name not in ("mask", "overlay"):
        raise ParameterError(f"{what} writes 'mask' or 'overlay' (uint8 arrays), got {name!r}")


def write_png_tiles(
    store: OutputStore,
    name: str = "overlay",
    tile: int | None = None,
    prefix: str | None = None,
    workers: int = 4,
) -> list[str]:
    """Write array ``name`` as one PNG per tile.

    Tile ``(ty, tx)`` goes to ``<prefix>/<ty>/<tx>.png`` (row index, then column index);
    its top-left pixel is ``(ty * tile, tx * tile)`` and it is ``tile`` pixels a side except
    in the last row and column, which hold the remainder.

    Parameters
    ----------
    store : OutputStore
        The store.
    name : {"overlay", "mask"}
        Array to write.
    tile : int, optional
        Tile side in pixels; default the store's chunk (then each tile reads one chunk).
    prefix : str, optional
        Root of the tiles (same filesystem and options as the store); default
        ``<store>_tiles/<name>`` beside the store (``out/a.zarr`` -> ``out/a_tiles/overlay``).
    workers : int
        Tiles encoded and written concurrently.

    Returns
    -------
    list of str
        URLs of the tiles written, row-major.
    """
    _check_uint8(name, "write_png_tiles")
    tile = store.chunk if tile is None else tile
    if tile < 1:
        raise ParameterError(f"tile must be >= 1, got {tile}")
    if workers < 1:
        raise ParameterError(f"workers must be >= 1, got {workers}")
    if prefix is None:
        root = beside(store.url, f"_tiles/{name}")
    else:
        root = normalize_url(prefix)
    arr = store.read(name)
    n_rows, n_cols = -(-store.height // tile), -(-store.width // tile)
    fs, root_path = fsspec.core.url_to_fs(root, **store.options)

    def one(ty: int, tx: int) -> str:
        y0, x0 = ty * tile, tx * tile
        pixels = arr[y0 : min(y0 + tile, store.height), x0 : min(x0 + tile, store.width)]
        out = join(root, str(ty), f"{tx}.png")
        write_png(out, np.ascontiguousarray(pixels), store.options)
        return out

    urls: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for ty in range(n_rows):
            if is_local(fs):
                fs.makedirs(join(root_path, str(ty)), exist_ok=True)
            urls.extend(pool.map(lambda tx, ty=ty: one(ty, tx), range(n_cols)))
    return urls


def _block_reduce(region: np.ndarray, f: int, method: str) -> np.ndarray:
    """Reduce ``region`` by ``f`` x ``f`` blocks (partial edge blocks use their own pixels)."""
    h, w = region.shape[:2]
    oh, ow = -(-h // f), -(-w // f)
    pad = [(0, oh * f - h), (0, ow * f - w)] + [(0, 0)] * (region.ndim - 2)
    if method == "max":
        padded = np.pad(region, pad)  # uint8: padding 0 never wins a max
        blocks = padded.reshape(oh, f, ow, f, *region.shape[2:])
        return blocks.max(axis=(1, 3))
    padded = np.pad(region.astype(np.float64), pad)
    sums = padded.reshape(oh, f, ow, f, *region.shape[2:]).sum(axis=(1, 3))
    rows = np.minimum(f, h - np.arange(oh) * f)
    cols = np.minimum(f, w - np.arange(ow) * f)
    counts = np.outer(rows, cols).reshape(oh, ow, *([1] * (region.ndim - 2)))
    return np.clip(np.rint(sums / counts), 0, 255).astype(np.uint8)


def write_quicklook(
    store: OutputStore,
    url_png: str,
    max_size: int = 2048,
    name: str = "overlay",
    method: Literal["mean", "max"] = "mean",
) -> tuple[int, int]:
    """Write a small PNG of the whole image, reducing it block by block.

    The image is shrunk by the integer factor ``f = ceil(max(H, W) / max_size)``; each output
    pixel is the mean (or max) of an ``f`` x ``f`` block. The array is read in pieces of about
    one chunk.

    Parameters
    ----------
    store : OutputStore
        The store.
    url_png : str
        Output PNG (written through fsspec with the store's options).
    max_size : int
        Largest side of the quick-look in pixels.
    name : {"overlay", "mask"}
        Array to show.
    method : {"mean", "max"}
        Block reduction; ``"max"`` keeps small anomalies of a mask visible.

    Returns
    -------
    (int, int)
        Height and width of the quick-look.
    """
    _check_uint8(name, "write_quicklook")
    if max_size < 1:
        raise ParameterError(f"max_size must be >= 1, got {max_size}")
    if method not in ("mean", "max"):
        raise ParameterError(f"method must be 'mean' or 'max', got {method!r}")
    arr = store.read(name)
    f = max(1, -(-max(store.height, store.width) // max_size))
    oh, ow = -(-store.height // f), -(-store.width // f)
    out = np.zeros((oh, ow, *arr.shape[2:]), dtype=np.uint8)
    step = f * max(1, store.chunk // f)  # multiple of f, about one chunk
    for y0 in range(0, store.height, step):
        y1 = min(y0 + step, store.height)
        for x0 in range(0, store.width, step):
            x1 = min(x0 + step, store.width)
            small = _block_reduce(arr[y0:y1, x0:x1], f, method)
            out[y0 // f : y0 // f + small.shape[0], x0 // f : x0 // f + small.shape[1]] = small
    write_png(normalize_url(url_png), out, store.options)
    return oh, ow


# --------------------------------------------------------------------------------------------
# GeoTIFF


def _row_bands(
    arr: zarr.Array, tile: int, max_band_bytes: int, chunk: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``(y0, rows)`` of ``arr`` in bands of whole tile rows, each at most about ``max_band_bytes``."""
    height, width = arr.shape[:2]
    row_bytes = tile * width * arr.dtype.itemsize * int(np.prod(arr.shape[2:], dtype=np.int64))
    per_band = max(1, min(-(-chunk // tile), max_band_bytes // max(row_bytes, 1)))
    band_rows = tile * per_band
    for y0 in range(0, height, band_rows):
        yield y0, min(y0 + band_rows, height)


def _gdal_compression(compression: str | None) -> str | None:
    if compression is None:
        return None
    key = str(compression).lower()
    if key not in _COMPRESSION:
        raise ParameterError(
            f"compression {compression!r} is not supported; use one of "
            f"{', '.join(sorted(_COMPRESSION))} or None"
        )
    return _COMPRESSION[key]


def _check_nodata(nodata: float | None, dtype: np.dtype, name: str) -> None:
    if nodata is None or dtype.kind not in "ui":
        return
    info = np.iinfo(dtype)
    if math.isnan(nodata) or not float(nodata).is_integer() or not info.min <= nodata <= info.max:
        raise ParameterError(f"nodata {nodata!r} is not representable in {name} ({dtype})")


def _write_local(
    path: str,
    store: OutputStore,
    name: str,
    crs: CRS | None,
    transform: Affine | None,
    nodata: float | None,
    tile: int,
    compression: str | None,
    bigtiff: bool,
    max_band_bytes: int,
    tags: Mapping[str, str],
) -> None:
    """Write array ``name`` to the local file ``path`` as a tiled GeoTIFF, one band of tile
    rows at a time (the mask recoded, see :data:`MASK_NODATA`; the overlay with an
    internal validity mask).

    ``crs`` and ``transform`` (rasterio CRS and affine transform, or None) place it.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    arr, score = store.read(name), store.read("score")
    height, width = arr.shape[:2]
    bands = arr.shape[2] if arr.ndim == 3 else 1
    profile: dict[str, Any] = {
        "driver": "GTiff", "height": height, "width": width, "count": bands, "dtype": arr.dtype.name,
        "crs": crs, "transform": transform, "nodata": nodata, "tiled": True,
        "blockxsize": tile, "blockysize": tile, "interleave": "pixel",
        "bigtiff": "YES" if bigtiff else "NO",
    }  # fmt: skip
    if name == "overlay":
        profile["photometric"] = "RGB"
    codec = _gdal_compression(compression)
    if codec is not None:
        profile["compress"] = codec
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # outputs without georeference
        with rasterio.open(path, "w", **profile) as dst:
            dst.update_tags(**tags)
            for band, text in enumerate(BAND_DESCRIPTIONS[name], start=1):
                dst.set_band_description(band, text)
            for y0, y1 in _row_bands(arr, tile, max_band_bytes, store.chunk):
                rows, window = np.asarray(arr[y0:y1]), Window(0, y0, width, y1 - y0)
                if name == "mask":
                    no_data = np.isnan(np.asarray(score[y0:y1]))
                    rows = np.where(no_data, MASK_NODATA, np.where(rows > 0, MASK_ANOMALOUS, MASK_NORMAL))
                    rows = rows.astype(np.uint8)
                elif name == "overlay":
                    dst.write_mask(np.where(np.isnan(np.asarray(score[y0:y1])), 0, 255).astype(np.uint8), window=window)
                pixels = np.moveaxis(rows, -1, 0) if rows.ndim == 3 else rows[None]
                dst.write(pixels, window=window)


def _to_cog(src: str, dst: str, name: str, tile: int, compression: str | None, bigtiff: bool) -> None:
    """Copy the tiled GeoTIFF ``src`` to a Cloud-Optimized GeoTIFF ``dst`` with overviews."""
    import rasterio
    import rasterio.shutil
    from rasterio.errors import NotGeoreferencedWarning

    options = {
        "BLOCKSIZE": tile, "OVERVIEWS": "AUTO", "OVERVIEW_RESAMPLING": _OVERVIEW_RESAMPLING[name],
        "BIGTIFF": "YES" if bigtiff else "NO", "COMPRESS": _gdal_compression(compression) or "NONE",
    }  # fmt: skip
    with rasterio.Env(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        rasterio.shutil.copy(src, dst, driver="COG", **options)


def write_geotiff(
    store: OutputStore,
    url_tif: str,
    name: str = "mask",
    georef: Mapping[str, Any] | None = None,
    nodata: float | None = None,
    tile: int = 512,
    compression: str | None = "zlib",
    tmp_dir: str | None = None,
    max_band_bytes: int = 256 * 2**20,
    tags: Mapping[str, Any] | None = None,
    cog: bool = True,
) -> None:
    """Write array ``name`` as a Cloud-Optimized GeoTIFF (or a plain tiled one), streaming.

    The pixels are written a band of tile rows at a time into a tiled GeoTIFF, which
    GDAL's COG driver then copies with overviews (nearest for the mask, average for the
    score and the overlay). ``mask.tif`` holds 1 where anomalous, 0 where normal and 255
    (its no-data value) where the score is NaN; the overlay carries an internal validity
    mask.

    The file is written under a temporary name and moved into place when complete, so no
    partial file ever carries the final name. For a remote ``url_tif`` it is written to a
    local temporary file and uploaded (object stores: straight to the final key, which
    appears only when the upload completes; other filesystems: to a temporary name, then
    moved). A BigTIFF is written when the uncompressed pixels exceed 2 GiB. Each band
    gets a description (:data:`BAND_DESCRIPTIONS`).

    Parameters
    ----------
    store : OutputStore
        The store.
    url_tif : str
        Output file (local path or fsspec URL; the store's storage options are used).
    name : {"mask", "score", "overlay"}
        Array to write (``overlay`` becomes an RGB GeoTIFF).
    georef : Georef, optional
        Where the image lies (:mod:`anomaly_dask.georef`; e.g. the input source's
        ``georef``, or :func:`anomaly_dask.georef.from_attrs` of the store's attributes).
        None: a plain tiled TIFF.
    nodata : float, optional
        The no-data value recorded in the file (``GDAL_NODATA``); default 255 for the mask
        (:data:`MASK_NODATA`), NaN for the score, none for the overlay.
    tile : int
        TIFF tile side, a positive multiple of 16 (at least 128 for a COG).
    compression : str or None
        ``"zlib"`` (deflate), ``"zstd"``, ``"lzw"``, ``"lzma"``, ``"packbits"``, ... or None.
    tmp_dir : str, optional
        Local folder for the temporary file of a remote upload (default: the system's).
    max_band_bytes : int
        Most bytes of pixels read at once (at least one row of tiles across the image).
    tags : dict, optional
        Dataset metadata (threshold, model fingerprint, ...), written as GDAL metadata items.
    cog : bool
        Write a Cloud-Optimized GeoTIFF with overviews (False: a plain tiled GeoTIFF).

    Raises
    ------
    ParameterError
        Unknown array, tile size or compression; ``nodata`` not representable in the
        array's type; a malformed georeference or one whose CRS GDAL does not know.
    OutputLocationError
        The local parent folder of ``url_tif`` does not exist.
    """
    if name not in ARRAY_NAMES:
        raise ParameterError(f"name must be one of {ARRAY_NAMES}, got {name!r}")
    if tile < 16 or tile % 16:
        raise ParameterError(f"tile must be a positive multiple of 16, got {tile}")
    if cog and tile < 128:
        raise ParameterError(f"tile={tile}: a Cloud-Optimized GeoTIFF needs tiles of at least 128 px (or cog=False)")
    _gdal_compression(compression)
    crs, transform = to_rasterio(georef)  # a bad georeference fails before any file is made
    arr = store.read(name)
    if nodata is None and name != "overlay":
        nodata = float(MASK_NODATA) if name == "mask" else float("nan")
    _check_nodata(nodata, arr.dtype, name)
    text_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    bigtiff = store.height * store.width * arr.dtype.itemsize * int(np.prod(arr.shape[2:])) > _BIGTIFF_BYTES

    url_tif = normalize_url(url_tif)
    fs, path = fsspec.core.url_to_fs(url_tif, **store.options)
    local = is_local(fs)
    if local and not os.path.isdir(os.path.dirname(path)):
        raise OutputLocationError(f"{url_tif}: parent folder {os.path.dirname(path)} does not exist")
    work_dir = tempfile.mkdtemp(prefix="anomaly_dask_tif_", dir=os.path.dirname(path) if local else tmp_dir)
    try:
        tmp = os.path.join(work_dir, Path(path).name + ".partial")
        _write_local(tmp, store, name, crs, transform, nodata, tile, compression, bigtiff, max_band_bytes, text_tags)
        if cog:
            tiled, tmp = tmp, os.path.join(work_dir, Path(path).name + ".cog.partial")
            _to_cog(tiled, tmp, name, tile, compression, bigtiff)
            os.remove(tiled)
        publish(fs, tmp, path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
