"""Finding images and opening each with the right reader.

:func:`open_source` is the one entry point for an input: TIFF / BigTIFF / GeoTIFF files and
zarr arrays are read window by window (:mod:`~anomaly_dask.io.tiff`,
:mod:`~anomaly_dask.io.zarr_source`), other image files are decoded whole by Pillow
(:mod:`~anomaly_dask.io.pillow`), numpy arrays are used as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np

from ..errors import InputNotFoundError, OutputError
from .base import ArraySource, ImageSource, check_array, url_path
from .pillow import open_pillow
from .tiff import TIFF_EXTENSIONS, CodecMissingError, TiffSource
from .zarr_source import ZARR_EXTENSIONS, ZARR_MARKERS, ZarrSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "is_raster",
    "is_zarr_folder",
    "list_images",
    "open_raster",
    "open_source",
    "output_names",
    "relative_stem",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, url: str, path: str) -> str:
    """Give ``path`` (as fs lists it) back the protocol of ``url``."""
    if "://" in url:
        return fs.unstrip_protocol(path)
    return path


def is_zarr_folder(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the folder ``path`` of ``fs`` is one zarr image: its name ends in ``.zarr``
    or it holds zarr metadata (``zarr.json``, ``.zarray``, ``.zgroup``)."""
    path = path.rstrip("/")
    return path.endswith(ZARR_EXTENSIONS) or any(fs.exists(f"{path}/{m}") for m in ZARR_MARKERS)


def _outermost(folders: Sequence[str]) -> list[str]:
    """``folders`` without those inside another of them, sorted."""
    out: list[str] = []
    for f in sorted(set(folders)):
        if not any(f.startswith(o + "/") for o in out):
            out.append(f)
    return out


def list_images(path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """List the images at ``path``: the file itself, or a folder searched recursively.

    A zarr store (a folder named ``*.zarr`` or holding zarr metadata) is one image, whether
    it is ``path`` itself or found inside the folder.

    Parameters
    ----------
    path : str
        Local path or fsspec URL of an image file or a folder.
    storage_options : dict, optional
        Passed to fsspec.

    Returns
    -------
    list of str
        Sorted image paths (zarr stores first). Files without an image extension are
        skipped with a warning.

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
    if is_zarr_folder(fs, fpath):
        return [path]
    found = fs.find(fpath, withdirs=True, detail=True)
    folders = [f.rstrip("/") for f, info in found.items() if info["type"] == "directory"]
    marked = [f.rsplit("/", 1)[0] for f, info in found.items()
              if info["type"] != "directory" and f.rsplit("/", 1)[-1] in ZARR_MARKERS]
    stores = _outermost([f for f in folders if f.endswith(ZARR_EXTENSIONS)] + marked)
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
    stems = [relative_stem(root, f, storage_options) for f in files]
    seen: dict[str, str] = {}
    for f, stem in zip(files, stems):
        if stem in seen:
            raise OutputError(
                f"{seen[stem]!r} and {f!r} would both be written as {stem}_mask.png; rename one "
                f"of them or score them in separate runs"
            )
        seen[stem] = str(f)
    return stems


def relative_stem(root: str, file: str, storage_options: dict[str, Any] | None = None) -> str:
    """The output stem of ``file`` found under ``root`` (see :func:`output_names`).

    Parameters
    ----------
    root : str
        A folder, or the file itself.
    file : str
        An image at or under ``root``.
    storage_options : dict, optional
        fsspec options.

    Returns
    -------
    str
        ``file``'s path relative to ``root`` without its extension, ``/``-separated, or
        its own name without extension when it is not under ``root``.
    """
    _, base = _fs(str(root), storage_options)
    _, path = _fs(str(file), storage_options)
    base, path = base.rstrip("/"), path.rstrip("/")
    rel = path[len(base) + 1 :] if path.startswith(base + "/") else path.rsplit("/", 1)[-1]
    head, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}/{stem}" if head else stem


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
    path = url_path(str(url))
    if path.endswith(TIFF_EXTENSIONS) or _is_zarr_path(path):
        return True
    if path.endswith(_PILLOW_EXTENSIONS):
        return False
    try:
        fs, fpath = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        if not fs.isdir(fpath):
            return False
        return any(fs.exists(f"{fpath.rstrip('/')}/{marker}") for marker in ZARR_MARKERS)
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
    if url_path(url).endswith(TIFF_EXTENSIONS):
        try:
            return TiffSource.open(url, storage_options)
        except CodecMissingError as err:
            warnings.warn(
                f"{err}; decoding the whole image with Pillow instead, which needs it to fit in memory",
                stacklevel=2,
            )
            return None
    return ZarrSource.open(url, storage_options)


def open_source(image: str | np.ndarray, storage_options: dict[str, Any] | None = None) -> ImageSource:
    """Open one image lazily.

    TIFF / BigTIFF / GeoTIFF files and zarr arrays are read window by window; other image
    files are decoded whole by Pillow.

    Parameters
    ----------
    image : str or ndarray
        A path/URL of an image file or zarr array, or an array (H, W) or (H, W, C) with C
        in 1, 3, 4.
    storage_options : dict, optional
        Passed to fsspec.

    Returns
    -------
    ImageSource

    Raises
    ------
    InputNotFoundError, ImageReadError
        Missing file; unreadable or unsupported image.
    """
    if isinstance(image, np.ndarray):
        return ArraySource(check_array(image, "array"))
    url = str(image)
    if is_raster(url, storage_options):
        raster = open_raster(url, storage_options)
        if raster is not None:
            return raster
    return open_pillow(url, storage_options)
