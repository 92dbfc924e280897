"""Image inputs: finding image files, opening them lazily, reading windows, intensity mapping.

An :class:`ImageSource` is a small picklable description of one image (a URL or a numpy
array) that reads any rectangle on demand, so a task ships the description and reads only
its window. Ordinary images (PNG, JPEG, BMP, TIFF read by Pillow) are decoded whole once per
process and cached: Pillow cannot read a region of a compressed image.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageReadError, InputNotFoundError, OutputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "ImageSource",
    "Intensity",
    "PILSource",
    "ScaledSource",
    "freeze_options",
    "match_bit_depth",
    "thaw_options",
    "list_images",
    "mirror_fill",
    "open_source",
    "output_names",
    "read_window",
    "to_unit_rgb",
    "valid_pixels",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, url: str, path: str) -> str:
    """Give ``path`` (as fs lists it) back the protocol of ``url``."""
    if "://" in url:
        return fs.unstrip_protocol(path)
    return path


def list_images(path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """List the images at ``path``: the file itself, or a folder searched recursively.

    Parameters
    ----------
    path : str
        Local path or fsspec URL of an image file or a folder.
    storage_options : dict, optional
        Passed to fsspec.

    Returns
    -------
    list of str
        Sorted image paths. Files without an image extension are skipped with a warning.

    Raises
    ------
    InputNotFoundError
        ``path`` does not exist, or the folder holds no image file.
    """
    path = str(path)
    fs, fpath = _fs(path, storage_options)
    if not fs.exists(fpath):
        raise InputNotFoundError(
            f"{path!r} does not exist: pass a folder of images or a single image file"
        )
    if not fs.isdir(fpath):
        return [path]
    if fpath.rstrip("/").endswith(".zarr"):
        return [path]
    found = fs.find(fpath, withdirs=True, detail=True)
    stores = sorted(f.rstrip("/") for f, info in found.items() if info["type"] == "directory" and f.rstrip("/").endswith(".zarr"))
    files = sorted(
        f for f, info in found.items()
        if info["type"] != "directory" and not any(f.startswith(z + "/") for z in stores)
    )
    images = stores + [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    others = [f for f in files if f not in images]
    for f in others:
        warnings.warn(f"skipping {f!r}: not an image file ({', '.join(IMAGE_EXTENSIONS)})", stacklevel=2)
    if not images:
        raise InputNotFoundError(
            f"folder {path!r} holds no image files (looked recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}; found {len(others)} other files)"
        )
    return [_unstrip(fs, path, f) for f in images]


def output_names(root: str, files: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Output stems of the images :func:`list_images` found under ``root``.

    Each stem is the image's path relative to ``root`` without its extension (``a/x`` for
    ``root/a/x.png``), or the file's own stem when ``root`` is a file, so that equal names in
    different folders stay apart.

    Parameters
    ----------
    root : str
        The folder or file given to :func:`list_images`.
    files : sequence of str
        What it returned.
    storage_options : dict, optional
        fsspec options.

    Returns
    -------
    list of str
        One stem per file, ``/``-separated.

    Raises
    ------
    OutputError
        Two inputs would share a stem (``x.png`` and ``x.tif`` in one folder).
    """
    fs, base = _fs(str(root), storage_options)
    base = base.rstrip("/")
    stems = []
    for f in files:
        _, path = _fs(str(f), storage_options)
        path = path.rstrip("/")
        rel = path[len(base) + 1 :] if path.startswith(base + "/") else path.rsplit("/", 1)[-1]
        head, _, name = rel.rpartition("/")
        stem = name.rsplit(".", 1)[0] if "." in name else name
        stems.append(f"{head}/{stem}" if head else stem)
    seen: dict[str, str] = {}
    for f, stem in zip(files, stems):
        if stem in seen:
            raise OutputError(
                f"{seen[stem]!r} and {f!r} would both be written as {stem}_mask.png; rename one "
                f"of them or score them in separate runs"
            )
        seen[stem] = str(f)
    return stems


@dataclass(frozen=True)
class Intensity:
    """Linear map of raw pixel values onto ``[0, 1]``: ``(x - low) / (high - low)``, clipped.

    Attributes
    ----------
    low, high : float
        Raw values mapped to 0 and 1.
    gray : bool
        Whether the model sees images as single-band (colour inputs converted to luminance)
        rather than RGB (single-band inputs replicated).
    fill : float
        Value in ``[0, 1]`` written into no-data pixels before the backbone (the median of
        valid training pixels), so that no-data borders look like plain seabed rather than
        a black cliff.
    """

    low: float = 0.0
    high: float = 255.0
    gray: bool = False
    fill: float = 0.5


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
    """

    name: str
    height: int
    width: int
    channels: int
    dtype: np.dtype
    nodata: float | None = None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw pixels of ``[y0, y1) x [x0, x1)`` (inside the image), shape (h, w, channels)."""
        raise NotImplementedError


def _to_raw(img: Image.Image, name: str) -> np.ndarray:
    """Pixels of a Pillow image as (h, w, 1 or 3); alpha dropped, palette expanded."""
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode == "LA":
        img, mode = img.getchannel("L"), "L"
    if mode in ("RGBA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX", "RGBa"):
        img, mode = img.convert("RGB"), "RGB"
    if mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode.startswith("I;16"):
            arr = arr.astype(np.uint16)
        return arr[:, :, None]
    if mode == "RGB":
        return np.asarray(img)
    raise ImageReadError(
        f"{name}: unsupported image mode {mode!r}; convert it to grayscale or RGB (8 or 16 bit)"
    )


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
    """The inverse of :func:`freeze_options`."""
    if isinstance(value, _FrozenDict):
        return {k: thaw_options(v) for k, v in value}
    if isinstance(value, _FrozenList):
        return [thaw_options(v) for v in value]
    return value


@lru_cache(maxsize=8)
def _decode(url: str, options_key: Any) -> np.ndarray:
    storage_options = thaw_options(options_key) or {}
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            data = f.read()
    except FileNotFoundError as err:
        raise InputNotFoundError(f"{url!r} does not exist") from err
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_raw(img, url)
    except Image.DecompressionBombError as err:
        raise ImageReadError(
            f"{url}: too large for Pillow ({err}); store it as a tiled TIFF or zarr instead"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageReadError):
            raise
        raise ImageReadError(
            f"{url}: cannot be read as an image ({err}); it is corrupt or not an image - "
            f"re-export it or remove it from the input folder"
        ) from err


@dataclass(frozen=True)
class PILSource(ImageSource):
    """An ordinary image file (PNG, JPEG, ...) decoded whole by Pillow, cached per process."""

    name: str
    height: int
    width: int
    channels: int
    dtype: np.dtype
    storage_options: Any = field(default=(), repr=False)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return _decode(self.name, self.storage_options)[y0:y1, x0:x1]

    def read_all(self) -> np.ndarray:
        """All raw pixels, shape (height, width, channels)."""
        return _decode(self.name, self.storage_options)


@dataclass(frozen=True, eq=False)
class ArraySource(ImageSource):
    """An in-memory numpy array."""

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


def _check_array(arr: np.ndarray, name: str) -> np.ndarray:
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
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageReadError(
            f"{name}: pixel dtype {arr.dtype} is not supported; use unsigned/signed integers or floats"
        )
    return arr


def open_source(image: str | np.ndarray, storage_options: dict[str, Any] | None = None) -> ImageSource:
    """Open one image lazily.

    TIFF / BigTIFF / GeoTIFF files and zarr arrays are read window by window
    (:mod:`anomaly_dask.rasters`); other image files are decoded whole by Pillow.

    Parameters
    ----------
    image : str or ndarray
        A path/URL of an image file or zarr array, or an array (H, W) or (H, W, C) with C
        in 1, 3, 4.
    storage_options : dict, optional
        Passed to fsspec.

    Raises
    ------
    InputNotFoundError, ImageReadError
        Missing file; unreadable or unsupported image.
    """
    if isinstance(image, np.ndarray):
        return ArraySource(_check_array(image, "array"))
    url = str(image)
    from .rasters import is_raster, open_raster  # rasters imports this module

    if is_raster(url, storage_options):
        raster = open_raster(url, storage_options)
        if raster is not None:
            return raster
    key = freeze_options(storage_options or {})
    raw = _decode(url, key)
    return PILSource(url, raw.shape[0], raw.shape[1], raw.shape[2], raw.dtype, key)


def read_window(source: ImageSource, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Raw pixels of any rectangle; parts outside the image are mirrored in (reflect)."""
    cy0, cy1 = max(0, y0), min(source.height, y1)
    cx0, cx1 = max(0, x0), min(source.width, x1)
    raw = source.read(cy0, cy1, cx0, cx1)
    pad = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
    if any(p for axis in pad for p in axis):
        raw = np.pad(raw, pad, mode="reflect")
    return raw


def valid_pixels(raw: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Pixels that hold data: not NaN (floats) and not ``nodata`` in every band.

    Returns
    -------
    ndarray of bool (h, w), or None when every pixel is valid (the common case, cheap).
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


def mirror_fill(x: np.ndarray, valid: np.ndarray, reach: int, fill: float) -> np.ndarray:
    """Fill invalid pixels with the valid data mirrored across the nearest edge, in place.

    An invalid pixel ``p`` whose nearest valid pixel ``b`` lies within ``reach`` takes the
    value at ``2 b - p`` (its reflection through the edge) when that pixel is valid and in
    the array, else the value at ``b``; farther pixels take ``fill``. Along a straight edge
    the texture continues as its own mirror image, so a backbone sees no artificial step
    where the data ends. Each filled value depends only on pixels within ``2 reach`` of it,
    so windows that overlap by that much fill their common pixels alike.

    Parameters
    ----------
    x : ndarray (h, w, c)
        Pixels; changed where ``valid`` is False.
    valid : ndarray of bool (h, w)
        Valid pixels.
    reach : int
        Largest distance to data, in pixels, filled by mirroring.
    fill : float
        Value of the other invalid pixels.

    Returns
    -------
    ndarray
        ``x``.
    """
    from scipy.ndimage import distance_transform_edt

    hole = ~valid
    if not valid.any():
        x[:] = fill
        return x
    dist, (ny, nx) = distance_transform_edt(hole, return_indices=True)
    far = hole & (dist > reach)
    py, px = np.nonzero(hole & ~far)
    by, bx = ny[py, px], nx[py, px]
    ry, rx = 2 * by - py, 2 * bx - px
    ok = (ry >= 0) & (ry < valid.shape[0]) & (rx >= 0) & (rx < valid.shape[1])
    ok[ok] = valid[ry[ok], rx[ok]]
    x[py, px] = x[np.where(ok, ry, by), np.where(ok, rx, bx)]
    x[far] = fill
    return x


def to_unit_rgb(
    raw: np.ndarray, intensity: Intensity, valid: np.ndarray | None = None, mirror: int = 0
) -> np.ndarray:
    """Map raw pixels (h, w, 1 or 3) to float32 RGB in ``[0, 1]`` as the model sees them.

    NaN becomes 0. Pixels where ``valid`` is False become ``intensity.fill``, or with
    ``mirror > 0`` the data mirrored across the nearest edge up to that many pixels from it
    (:func:`mirror_fill`).
    """
    x = raw.astype(np.float32)
    scale = 1.0 / max(intensity.high - intensity.low, 1e-12)
    x = np.nan_to_num(np.clip((x - intensity.low) * scale, 0.0, 1.0), nan=0.0)
    if valid is not None:
        if mirror > 0:
            mirror_fill(x, valid, mirror, intensity.fill)
        else:
            x[~valid] = intensity.fill
    if intensity.gray and x.shape[2] == 3:
        x = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return x


def fit_intensity(
    sources: Sequence[ImageSource], samples: Sequence[np.ndarray], nodata: float | None = None
) -> Intensity:
    """Choose the intensity map for a training set.

    Parameters
    ----------
    sources : sequence of ImageSource
        Training images.
    samples : sequence of ndarray
        Raw pixel samples from them.
    nodata : float, optional
        Value excluded from the percentiles (NaN always is).

    Returns
    -------
    Intensity
        ``[0, 255]`` for 8-bit data; otherwise the 0.5 and 99.5 percentiles of the valid
        sampled values. ``gray`` is set when every training image has one band; ``fill`` is
        the median valid value.
    """
    gray = all(s.channels == 1 for s in sources)
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples])
    values = values[np.isfinite(values)]
    if nodata is not None and not np.isnan(nodata):
        values = values[values != nodata]
    if values.size == 0:
        raise ImageReadError(
            "training images hold no valid pixel values (all NaN or no-data); check nodata="
        )
    if all(np.dtype(s.dtype) == np.uint8 for s in sources):
        low, high = 0.0, 255.0
    else:
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        if high <= low:
            high = low + 1.0
    fill = float(np.clip((np.median(values) - low) / (high - low), 0.0, 1.0))
    return Intensity(low, high, gray, fill)


# ---------------------------------------------------------------------------- bit depth
#: Full-scale value of each integer pixel type a model may meet (floats: see match_bit_depth).
_FULL_SCALE = {"uint8": 255.0, "uint16": 65535.0}


@dataclass(frozen=True, eq=False)
class ScaledSource(ImageSource):
    """Another source's pixels times ``factor`` (float32): the same data at another bit depth.

    No-data pixels (the inner source's no-data value or any of ``nodata_raw``) read as NaN,
    so that no comparison with a rescaled no-data value is needed.

    Attributes
    ----------
    inner : ImageSource
        The image as stored.
    factor : float
        Multiplier taking its values to the units the model was trained on.
    nodata_raw : tuple of float
        Raw values (in ``inner``'s units) that mean no data.
    """

    inner: ImageSource
    factor: float
    nodata_raw: tuple = ()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def height(self) -> int:  # type: ignore[override]
        return self.inner.height

    @property
    def width(self) -> int:  # type: ignore[override]
        return self.inner.width

    @property
    def channels(self) -> int:  # type: ignore[override]
        return self.inner.channels

    @property
    def dtype(self) -> np.dtype:  # type: ignore[override]
        return np.dtype(np.float32)

    @property
    def nodata(self) -> float | None:  # type: ignore[override]
        return float("nan")

    @property
    def georef(self) -> Any:
        return getattr(self.inner, "georef", None)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raw = self.inner.read(y0, y1, x0, x1)
        out = raw.astype(np.float32) * np.float32(self.factor)
        for value in self.nodata_raw:
            if value is not None and not np.isnan(value):
                out[(raw == value).all(axis=2)] = np.nan
        return out


def _sample_max(source: ImageSource, nodata: float | None, n: int = 4, side: int = 256) -> float:
    """Largest valid value in an ``n`` x ``n`` lattice of windows spread over ``source``."""
    best = float("-inf")
    h, w = min(side, source.height), min(side, source.width)
    for y in np.linspace(0, source.height - h, n).astype(int):
        for x in np.linspace(0, source.width - w, n).astype(int):
            block = np.asarray(source.read(int(y), int(y) + h, int(x), int(x) + w), dtype=np.float64)
            block = block[np.isfinite(block)]
            if nodata is not None and not np.isnan(nodata):
                block = block[block != nodata]
            if block.size:
                best = max(best, float(block.max()))
    return best


def match_bit_depth(source: ImageSource, trained: str | None, nodata: float | None) -> ImageSource:
    """``source`` in the units of a model trained on ``trained`` pixels, or a clear error.

    A model maps raw values to its input range with a map learned on its training images, so
    the same picture stored at another bit depth must be rescaled first. Handled: 8-bit and
    16-bit copies of each other (by the ratio of full scales, 65535 / 255 = 257, or as they
    are when a 16-bit image holds only 8-bit values), and float copies in ``[0, 1]`` or in
    the integer type's own range. Models trained on other types (float, signed, mixed) take
    inputs as they are.

    Parameters
    ----------
    source : ImageSource
        The image to score.
    trained : str or None
        The pixel type of the model's training images (``"uint8"``, ``"uint16"``, another
        numpy type name, ``"mixed"``, or None for a model that does not record it).
    nodata : float, optional
        The run's no-data value (raw units), if any.

    Returns
    -------
    ImageSource
        ``source`` itself, or a :class:`ScaledSource` over it.

    Raises
    ------
    ImageReadError
        When the values fit neither reading (e.g. float values up to 4000 for an 8-bit
        model); the message says how to convert the image.
    """
    have = np.dtype(source.dtype).name
    if trained is None or have == trained or trained not in _FULL_SCALE:
        return source
    full = _FULL_SCALE[trained]
    nd = nodata if nodata is not None else source.nodata
    top = _sample_max(source, nd)
    factor: float | None = None
    if have in _FULL_SCALE:
        if top <= full:
            factor = 1.0  # e.g. 8-bit values stored in a 16-bit file
        else:
            factor = full / _FULL_SCALE[have]
        if have == "uint8" and trained == "uint16":
            factor = _FULL_SCALE["uint16"] / _FULL_SCALE["uint8"]
    elif np.issubdtype(np.dtype(have), np.floating):
        if top <= 1.0:
            factor = full
        elif top <= full:
            factor = 1.0
    if factor is None:
        raise ImageReadError(
            f"{source.name}: pixels are {have} with values up to {top:g}, but the model was "
            f"trained on {trained} images (0-{full:g}); convert the image to {trained}, or "
            f"scale it to [0, 1] or [0, {full:g}], or train a model on images like it"
        )
    how = "used as they are (they lie in its range)" if factor == 1.0 else f"multiplied by {factor:g}"
    warnings.warn(
        f"{source.name}: {have} pixels scored by a model trained on {trained} images; values {how}",
        stacklevel=2,
    )
    if factor == 1.0 and have in _FULL_SCALE:
        return source
    return ScaledSource(source, float(factor), tuple(v for v in (source.nodata, nodata) if v is not None))
