"""Identity of a detection run: what must match for an output store to be resumed.

A detection run writes a resumable output store (:mod:`anomaly_dask.store`). Resuming is
only safe when everything that shapes the stored pixels is the same as when the store was
started: the model, the threshold, the rendering settings and the input image itself. This
module turns those into a JSON document (the *identity*), a short run id derived from it
(:func:`run_id_of`), and a readable list of what differs between two identities
(:func:`describe_differences`).

The input's part, :func:`input_identity`, has to be cheap even for a 20000 x 20000 mosaic
on object storage, where hashing every byte would cost a full read of the image: see its
notes for the signals used and what they can miss.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np

from .io import ArraySource, ImageSource, thaw_options

__all__ = [
    "HEAD_BYTES",
    "SAMPLE_GRID",
    "SAMPLE_SIDE",
    "describe_differences",
    "input_identity",
    "jsonable",
    "run_id_of",
]

log = logging.getLogger("anomaly_dask")

#: Bytes at the start of an input file that are hashed (TIFF header, first IFD, often tags).
HEAD_BYTES = 64 * 1024
#: Pixel windows sampled per axis: ``SAMPLE_GRID`` x ``SAMPLE_GRID`` windows, corners included.
SAMPLE_GRID = 4
#: Side of a sampled pixel window in pixels.
SAMPLE_SIDE = 64

#: fsspec ``info()`` keys (lower case) that are derived from the bytes of an object.
_CONTENT_KEYS = ("etag", "md5", "md5hash", "content_md5", "contentmd5", "crc32c", "checksum", "sha256")
#: fsspec ``info()`` keys (lower case) holding a modification (or creation) time.
_TIME_KEYS = ("mtime", "lastmodified", "last_modified", "updated", "modified", "created", "creation_time")

#: Readable names of the identity keys written by ``AnomalyDetector.detect``.
_LABELS = {
    "model": "the model differs",
    "threshold": "the threshold differs",
    "input": "the input path differs",
    "shape": "the input's size differs",
    "input_content": "the input changed",
}


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: tuples become lists, numpy scalars Python numbers.

    Non-finite floats become the strings ``"nan"``, ``"inf"`` and ``"-inf"``, so that the
    result passes ``json.dumps(..., allow_nan=False)`` and compares equal to itself (NaN
    does not).

    Parameters
    ----------
    value : Any
        Nested dicts, lists, tuples, strings, numbers, numpy scalars, None.

    Returns
    -------
    Any
        The same structure in JSON types; unknown objects become their ``str``.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_id_of(identity: Mapping[str, Any]) -> str:
    """A 32-hex-digit run id: the sha256 of the identity's canonical JSON, shortened.

    Parameters
    ----------
    identity : dict
        The run's identity (passed through :func:`jsonable` first).

    Returns
    -------
    str
        Equal for equal identities, different (with overwhelming probability) otherwise.
    """
    text = json.dumps(jsonable(identity), sort_keys=True, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Say, in words, which parts of two run identities differ.

    Parameters
    ----------
    old : dict
        The identity recorded in an existing store.
    new : dict
        The identity of the run that wants to write there.

    Returns
    -------
    list of str
        One phrase per differing key, e.g. ``"the input changed (file version, sampled
        pixels)"``, ``"params differs (upsample)"`` or ``"overlay_color differs (store:
        [255, 0, 0], now: [0, 0, 255])"``; empty when the identities are equal.
    """
    old, new = jsonable(old), jsonable(new)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        label = _LABELS.get(key, f"{key} differs")
        if isinstance(a, dict) and isinstance(b, dict):  # name the parts, e.g. params
            names = _CONTENT_LABELS if key == "input_content" else {}
            parts = [names.get(k, k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"{label} ({', '.join(parts)})")
        elif key == "model":
            out.append(f"{label} (store: {str(a)[:12]}, now: {str(b)[:12]})")
        else:
            out.append(f"{label} (store: {_short(a)}, now: {_short(b)})")
    return out


_CONTENT_LABELS = {
    "size": "file size",
    "version": "file version (modification time / ETag)",
    "head_sha256": "first bytes of the file",
    "listing_sha256": "files of the array",
    "pixels_sha256": "sampled pixels",
    "array_sha256": "array content",
    "dtype": "pixel type",
    "channels": "band count",
    "nodata": "the file's no-data value",
}


# --------------------------------------------------------------------------------------------
# the input


def _normalise(value: Any) -> Any:
    """One ``info()`` value in a stable JSON form (quotes stripped, times as epoch seconds)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, str):
        return value.strip().strip('"')
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return None  # nested structures (e.g. adlfs content_settings): not used


def _version(info: Mapping[str, Any]) -> dict[str, Any]:
    """The change signals of an ``info()`` record: content tokens if any, else times."""
    lowered = {str(k).lower(): v for k, v in info.items()}
    content = {k: _normalise(lowered[k]) for k in _CONTENT_KEYS if k in lowered}
    content = {k: v for k, v in content.items() if v not in (None, "")}
    if content:
        return content
    times = {k: _normalise(lowered[k]) for k in _TIME_KEYS if k in lowered}
    return {k: v for k, v in times.items() if v not in (None, "")}


def _backing(source: ImageSource) -> tuple[str, dict[str, Any]] | None:
    """URL and fsspec options of the file or folder behind ``source``, or None (in memory)."""
    inner = source
    while getattr(inner, "inner", None) is not None:  # wrappers such as ScaledSource
        inner = inner.inner
    if isinstance(inner, ArraySource) or not hasattr(inner, "storage_options"):
        return None
    # ZarrSource.name joins url and the array's path; TiffSource/PILSource.name is the URL
    options = thaw_options(getattr(inner, "storage_options", ()) or ())
    return str(inner.name), options if isinstance(options, dict) else dict(options)


def _sha256_array(array: np.ndarray) -> str:
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def _sample_windows(height: int, width: int, grid: int, side: int) -> list[tuple[int, int, int, int]]:
    """``grid`` x ``grid`` windows of ``side`` px on an even lattice; the corners are included."""
    h, w = min(side, height), min(side, width)
    ys = sorted({int(v) for v in np.linspace(0, height - h, grid)})
    xs = sorted({int(v) for v in np.linspace(0, width - w, grid)})
    return [(y, y + h, x, x + w) for y in ys for x in xs]


def _pixels_sha256(source: ImageSource, grid: int, side: int) -> str:
    digest = hashlib.sha256()
    for y0, y1, x0, x1 in _sample_windows(source.height, source.width, grid, side):
        block = np.asarray(source.read(y0, y1, x0, x1))
        digest.update(f"{y0},{y1},{x0},{x1}:{block.dtype.str}{block.shape};".encode())
        digest.update(memoryview(np.ascontiguousarray(block)).cast("B"))
    return digest.hexdigest()


def _file_signals(url: str, options: dict[str, Any], head_bytes: int) -> dict[str, Any]:
    """Size, version, head hash (files) or metadata + listing hash (folders, e.g. zarr)."""
    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.invalidate_cache(path)
    info = fs.info(path)
    out: dict[str, Any] = {}
    if info.get("type") != "directory":
        out["kind"] = "file"
        out["size"] = info.get("size")
        out["version"] = _version(info)
        with fs.open(path, "rb") as f:
            out["head_sha256"] = hashlib.sha256(f.read(head_bytes)).hexdigest()
        return out
    # a zarr array: its chunks are separate objects; one listing gives each one's signals
    out["kind"] = "directory"
    root = path.rstrip("/")
    entries = fs.find(root, detail=True)
    digest = hashlib.sha256()
    total = 0
    for name in sorted(entries):
        entry = entries[name]
        if entry.get("type") == "directory":
            continue
        rel = name[len(root) :].lstrip("/") if name.startswith(root) else name
        size = entry.get("size")
        total += int(size or 0)
        digest.update(json.dumps([rel, size, _version(entry)], sort_keys=True, default=str).encode())
        digest.update(b"\n")
        if rel.rsplit("/", 1)[-1] in ("zarr.json", ".zarray", ".zattrs") and rel.count("/") == 0:
            digest.update(fs.cat_file(name)[:head_bytes])
    out["size"] = total
    out["listing_sha256"] = digest.hexdigest()
    return out


def input_identity(
    source: ImageSource,
    *,
    head_bytes: int = HEAD_BYTES,
    sample_grid: int = SAMPLE_GRID,
    sample_side: int = SAMPLE_SIDE,
) -> dict[str, Any]:
    """A content fingerprint of an input image, cheap enough for huge remote mosaics.

    Parameters
    ----------
    source : ImageSource
        The opened input (as :func:`~anomaly_dask.io.open_source` returns it, possibly
        wrapped, e.g. rescaled to the model's bit depth).
    head_bytes : int
        Bytes hashed at the start of a file.
    sample_grid : int
        Pixel windows sampled per axis (``sample_grid ** 2`` windows in all).
    sample_side : int
        Side of each sampled window in pixels.

    Returns
    -------
    dict
        JSON data; equal for an unchanged input. Keys: ``dtype``, ``channels``, ``nodata``
        and, for an in-memory array, ``kind="array"`` and ``array_sha256``; for a file,
        ``kind="file"``, ``size``, ``version``, ``head_sha256`` and ``pixels_sha256``; for
        a folder (a zarr array), ``kind="directory"``, ``size`` (sum of its files),
        ``listing_sha256`` and ``pixels_sha256``.

    Notes
    -----
    Signals used, and why:

    * In-memory arrays are hashed whole (sha256): this costs far less than scoring them.
    * For a file, what fsspec ``info()`` reports: its size and a *version*, normalised to
      the content tokens the filesystem offers (S3/Azure ``ETag``, GCS ``md5Hash`` /
      ``crc32c``) or, when it offers none, its times (local disks: the modification time
      and the inode change time, which fsspec reports as ``created`` and which no tool can
      set back; SFTP, HTTP: the modification time). A rewrite or a new upload changes
      these, and they cost one metadata request. Content tokens are preferred over times
      so that re-uploading identical bytes is not taken for a change.
    * A sha256 of the first ``head_bytes`` of the file: the TIFF header and tags (size,
      tiling, compression, georeference, often the first tiles of a small image).
    * A sha256 of ``sample_grid`` x ``sample_grid`` windows of ``sample_side`` pixels read
      through ``source`` on an even lattice that includes the four corners: this catches
      in-place edits that keep the size and the modification time, when they touch a
      sampled window. For a 20000 x 20000 mosaic this reads 16 tiles instead of the
      whole image.
    * For a zarr array (a folder), one recursive listing: the name, size and version of
      every chunk object, hashed, plus the array's metadata documents; then the pixel
      samples. Rewriting any chunk changes its modification time or ETag.

    What it can miss: an edit that keeps the file's size and its version (on a filesystem
    that reports only a modification time, which was restored, e.g. with ``touch -r``; or
    one that reports neither a time nor a content token) and touches neither the first
    ``head_bytes`` nor a sampled window; for a zarr array, the same for each chunk object.
    False alarms are possible the other way: ``touch`` or ``chmod`` alone changes the
    version of a local file, which then counts as changed (the safe direction: the run is
    refused, not mixed).
    """
    raw_nodata = getattr(source, "nodata", None)
    ident: dict[str, Any] = {
        "dtype": np.dtype(source.dtype).str,
        "channels": int(source.channels),
        "nodata": jsonable(None if raw_nodata is None else float(raw_nodata)),
    }
    inner = source
    while getattr(inner, "inner", None) is not None:
        inner = inner.inner
    if isinstance(inner, ArraySource):
        ident["kind"] = "array"
        array = np.asarray(inner.array)
        if inner is not source:  # a wrapper changes values: hash what is scored as well
            ident["pixels_sha256"] = _pixels_sha256(source, sample_grid, sample_side)
        ident["array_sha256"] = _sha256_array(array)
        return jsonable(ident)
    backing = _backing(source)
    if backing is not None:
        url, options = backing
        try:
            ident.update(_file_signals(url, options, head_bytes))
        except (OSError, NotImplementedError, ValueError) as err:  # exotic filesystems
            log.debug("%s: no file signals for the run identity (%s)", url, err)
            ident["kind"] = "unknown"
    else:
        ident["kind"] = "unknown"
    ident["pixels_sha256"] = _pixels_sha256(source, sample_grid, sample_side)
    return jsonable(ident)
