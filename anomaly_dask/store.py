"""Chunked, resumable output store of a detection run, plus streaming exporters.

A detection run over a huge image (tens of thousands of pixels a side) writes its results
chunk by chunk from Dask workers into one zarr v3 group, through fsspec (local paths,
``s3://``, ``memory://``, ...):

``score``
    float32 (H, W), the per-pixel anomaly score.
``mask``
    uint8 (H, W), 0/255 binary mask.
``overlay``
    uint8 (H, W, 3), the image with the mask blended over it.

All three arrays are chunked ``(chunk, chunk[, 3])``; chunk boundaries lie at multiples of
``chunk`` (the last row and column of chunks may be smaller). A worker writes exactly one
zarr chunk of each array, so no locks are needed. After the data it writes a small
*completion marker* ``<url>/_done/<iy>.<ix>`` holding the run id, so that a crashed run can
be resumed: :meth:`OutputStore.done_chunks` lists the markers (one listing) and the driver
submits only the missing chunks. A chunk whose pixels are all zero is still marked done (and
still written: ``write_empty_chunks`` is on), so "done" never depends on the data.

Layout of the store at ``url``::

    <url>/zarr.json            group metadata; attributes include run_id, complete, layout
    <url>/score/...            zarr array
    <url>/mask/...             zarr array
    <url>/overlay/...          zarr array
    <url>/_done/<iy>.<ix>      completion marker of chunk (iy, ix), content = run id
    <url>/png/<name>/<ty>/<tx>.png   PNG tiles (optional, :func:`write_png_tiles`)
    <url>.lock                 lease of the run writing the store (:class:`StoreLease`)

A run is identified by its run id, a hash of everything that shapes the stored pixels
(:mod:`anomaly_dask.identity`). :meth:`OutputStore.create` resumes a store only for the
same run id; given the identity itself it also records it (attribute ``identity``) and, on
a mismatch, names what differs.

One store has one writer at a time: :class:`StoreLease` claims ``<url>.lock`` beside the
store (created atomically on local disks), refreshes a heartbeat in it while the run lasts
and removes it at the end. A second run, and ``overwrite=True``, are refused while the
lease is live; a lease left by a dead process (or with an old heartbeat) is taken over.

The exporters (:func:`write_png_tiles`, :func:`write_quicklook`, :func:`write_geotiff`)
stream: they read the zarr arrays a few chunks at a time and never hold a whole array.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from .errors import AnomalyDaskError, InputNotFoundError, ParameterError
from .identity import describe_differences, jsonable
from .outputs import write_png

log = logging.getLogger("anomaly_dask")

__all__ = [
    "ARRAY_NAMES",
    "OutputExistsError",
    "OutputIncompleteError",
    "OutputLocationError",
    "OutputLockedError",
    "OutputNotWritableError",
    "OutputStore",
    "StoreLease",
    "georef_from_tiff",
    "lease_url",
    "read_lease",
    "write_geotiff",
    "write_png_tiles",
    "write_quicklook",
]

#: Names of the arrays of an output store.
ARRAY_NAMES = ("score", "mask", "overlay")

_DTYPES = {"score": np.dtype(np.float32), "mask": np.dtype(np.uint8), "overlay": np.dtype(np.uint8)}
_FORMAT_KEY = "anomaly_dask_output"  # group attribute identifying a store written by this module
_FORMAT_VERSION = 1
_RESERVED_ATTRS = ("run_id", "complete", "layout", "summary", "identity", _FORMAT_KEY)
_DONE_DIR = "_done"
_DONE_DESCRIPTION = "completion markers <iy>.<ix> of the chunks written, each holding the run id"
_MARKER_RE = re.compile(r"^(\d+)\.(\d+)$")
_BIGTIFF_BYTES = 2**31  # uncompressed size above which write_geotiff writes a BigTIFF
#: fsspec protocols whose uploads appear atomically under their final name.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})


class OutputExistsError(AnomalyDaskError, FileExistsError):
    """An output store of another run (or something that is not an output store) is in the way."""


class OutputLockedError(OutputExistsError):
    """Another live run holds the lease of the output store (see :class:`StoreLease`)."""


class OutputLocationError(InputNotFoundError):
    """The place an output should go does not exist (missing bucket or parent folder)."""


class OutputNotWritableError(AnomalyDaskError, PermissionError):
    """The output location exists but cannot be written."""


class OutputIncompleteError(AnomalyDaskError, RuntimeError):
    """A store was finalized (or exported as finished) while some chunks are not done."""


# --------------------------------------------------------------------------------------------
# helpers


def _is_uri(url: str) -> bool:
    """True for an fsspec URL (``s3://...``, ``memory://...``, chained ``a::b``)."""
    return "://" in url or "::" in url


def _normalize_url(url: str | os.PathLike[str]) -> str:
    """Strip trailing slashes; make plain local paths absolute (workers may run elsewhere)."""
    text = os.fspath(url)
    if not text:
        raise ParameterError("url must not be empty")
    if _is_uri(text):
        return text.rstrip("/") if not text.endswith("://") else text
    return os.path.abspath(os.path.expanduser(text))


def _options_key(storage_options: Mapping[str, Any] | None) -> tuple:
    return tuple(sorted((storage_options or {}).items()))


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ParameterError(f"{what} must be JSON-serialisable (no NaN/inf): {err}") from err


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool(set(protocols) & _OBJECT_STORES)


# --------------------------------------------------------------------------------------------
# the store


@dataclass(frozen=True)
class OutputStore:
    """Description of the output store of one detection run (picklable, holds no handles).

    Make one with :meth:`create` (new run or resume) or :meth:`open` (read an existing store);
    ship it to workers, which call :meth:`write_chunk`. Every method opens what it needs in
    the calling process.

    Parameters
    ----------
    url : str
        Root of the zarr group: a local path or an fsspec URL.
    height, width : int
        Image size in pixels.
    chunk : int
        Side of the square chunks in pixels. Chunk ``(iy, ix)`` covers rows
        ``iy*chunk : min((iy+1)*chunk, height)`` and the matching columns.
    storage_options : tuple
        fsspec options as sorted ``(key, value)`` pairs (see :attr:`options`).
    run_id : str
        Identifier of the run; written into the completion markers.
    """

    url: str
    height: int
    width: int
    chunk: int
    storage_options: tuple = field(default=(), repr=False, hash=False)  # may hold dicts; secrets
    run_id: str = ""

    # ---- layout ---------------------------------------------------------------------------

    @property
    def options(self) -> dict[str, Any]:
        """The fsspec storage options as a dict."""
        return dict(self.storage_options)

    @property
    def n_rows(self) -> int:
        """Number of chunk rows."""
        return -(-self.height // self.chunk)

    @property
    def n_cols(self) -> int:
        """Number of chunk columns."""
        return -(-self.width // self.chunk)

    @property
    def n_chunks(self) -> int:
        """Number of chunks."""
        return self.n_rows * self.n_cols

    def all_chunks(self) -> list[tuple[int, int]]:
        """Every chunk index ``(iy, ix)`` in row-major order."""
        return [(iy, ix) for iy in range(self.n_rows) for ix in range(self.n_cols)]

    def chunk_bounds(self, iy: int, ix: int) -> tuple[int, int, int, int]:
        """Pixel bounds ``(y0, y1, x0, x1)`` of chunk ``(iy, ix)``.

        Raises
        ------
        ParameterError
            If the index is outside the chunk grid.
        """
        if not (0 <= iy < self.n_rows and 0 <= ix < self.n_cols):
            raise ParameterError(
                f"chunk index ({iy}, {ix}) is outside the {self.n_rows} x {self.n_cols} chunk grid"
            )
        y0, x0 = iy * self.chunk, ix * self.chunk
        return y0, min(y0 + self.chunk, self.height), x0, min(x0 + self.chunk, self.width)

    # ---- opening --------------------------------------------------------------------------

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(self.url, **self.options)

    def _zarr_kwargs(self) -> dict[str, Any]:
        # zarr refuses storage_options for plain local paths
        return {"storage_options": self.options} if _is_uri(self.url) else {}

    def _open_array(self, name: str, mode: Literal["r", "r+"]) -> zarr.Array:
        if name not in ARRAY_NAMES:
            raise ParameterError(f"name must be one of {ARRAY_NAMES}, got {name!r}")
        arr = zarr.open_array(self.url, path=name, mode=mode, zarr_format=3, **self._zarr_kwargs())
        if mode != "r":
            arr = arr.with_config({"write_empty_chunks": True})
        return arr

    def _open_group(self, mode: Literal["r", "r+"]) -> zarr.Group:
        return zarr.open_group(self.url, mode=mode, zarr_format=3, **self._zarr_kwargs())

    def read(self, name: str) -> zarr.Array:
        """Open array ``name`` (``"score"``, ``"mask"`` or ``"overlay"``) read-only.

        Parameters
        ----------
        name : str
            Array name.

        Returns
        -------
        zarr.Array
            The array; index it to read pixels.
        """
        return self._open_array(name, "r")

    @property
    def attrs(self) -> dict[str, Any]:
        """The group attributes as stored now (a fresh read)."""
        return dict(self._open_group("r").attrs)

    @classmethod
    def open(
        cls, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
    ) -> OutputStore:
        """Describe an existing output store (for readers and exporters).

        Parameters
        ----------
        url : str or os.PathLike
            Root of the store.
        storage_options : dict, optional
            fsspec options (credentials, endpoint, ...).

        Returns
        -------
        OutputStore

        Raises
        ------
        InputNotFoundError
            If no output store is at ``url``.
        """
        url = _normalize_url(url)
        probe = cls(url, 1, 1, 1, _options_key(storage_options))
        attrs = _read_group_attrs(probe)
        if attrs is None or _FORMAT_KEY not in attrs:
            raise InputNotFoundError(f"{url}: no anomaly_dask output store here")
        layout = attrs["layout"]
        return cls(
            url, int(layout["height"]), int(layout["width"]), int(layout["chunk"]),
            _options_key(storage_options), str(attrs["run_id"]),
        )  # fmt: skip

    @classmethod
    def create(
        cls,
        url: str | os.PathLike[str],
        height: int,
        width: int,
        chunk: int,
        run_id: str,
        attrs: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        *,
        identity: Mapping[str, Any] | None = None,
        lease: StoreLease | None = None,
    ) -> OutputStore:
        """Create the output store of a run, or reopen it to resume the same run.

        Parameters
        ----------
        url : str or os.PathLike
            Root of the zarr group (local path or fsspec URL). For a local path the parent
            folder must exist; for a bucket URL the bucket must exist.
        height, width : int
            Image size in pixels.
        chunk : int
            Side of the square chunks in pixels.
        run_id : str
            Identifier of this run. Reopening with the same id resumes: done chunks are kept.
        attrs : dict, optional
            JSON-serialisable attributes stored on the group (parameters, input URL, ...).
            The keys ``run_id``, ``complete``, ``layout``, ``summary``,
            ``anomaly_dask_output`` (and ``identity`` when given) are set by the store and
            override these.
        storage_options : dict, optional
            fsspec options (credentials, endpoint, ...), also used by the workers.
        overwrite : bool
            Delete an existing store of another run (or a stray zarr hierarchy) at ``url``
            and start afresh. Never deletes a folder that is not a zarr store, nor a store
            whose lease another run holds.
        identity : dict, optional
            What ``run_id`` was derived from (see :mod:`anomaly_dask.identity`); stored as
            the attribute ``identity`` so that a later run of another id is told what
            differs (e.g. "the input changed", "overlay_color differs").
        lease : StoreLease, optional
            The caller's own, held lease of ``url``. Any other live lease of ``url`` makes
            this call fail; without one, any live lease does.

        Returns
        -------
        OutputStore

        Raises
        ------
        ParameterError
            On invalid sizes, an empty ``run_id``, attributes that are not JSON, or a
            ``lease`` of another url.
        OutputLocationError
            If the parent folder or the bucket does not exist (nothing is written).
        OutputNotWritableError
            If the location cannot be written (nothing is written).
        OutputLockedError
            If another live run holds the lease of ``url`` (nothing is written or deleted,
            even with ``overwrite``).
        OutputExistsError
            If a store of another run (or with another layout) is at ``url`` and ``overwrite``
            is false, or if ``url`` holds something that is not a zarr store.
        """
        for key, value in (("height", height), ("width", width), ("chunk", chunk)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ParameterError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(run_id, str) or not run_id:
            raise ParameterError(f"run_id must be a non-empty string, got {run_id!r}")
        user_attrs = dict(attrs or {})
        _check_json(user_attrs, "attrs")
        ident = None if identity is None else jsonable(dict(identity))
        _check_json(ident, "identity")
        url = _normalize_url(url)
        if lease is not None and lease.url != url:
            raise ParameterError(f"lease is of {lease.url}, not of {url}")
        store = cls(url, int(height), int(width), int(chunk), _options_key(storage_options), run_id)
        fs, path = store._fs()

        _check_location(fs, path, url)
        _check_writable(fs, path, url)
        _refuse_live_lease(fs, path, url, None if lease is None else lease.token)
        existing = _existing_kind(store, fs, path)
        if existing is not None:
            kind, old_attrs = existing
            if kind == "ours" and not overwrite:
                old_id = str(old_attrs.get("run_id"))
                if old_id != run_id:
                    why = ""
                    old_ident = old_attrs.get("identity")
                    if isinstance(old_ident, dict) and ident is not None:
                        diffs = describe_differences(old_ident, ident)
                        why = f" ({'; '.join(diffs)})" if diffs else ""
                    elif ident is not None:
                        why = " (the store records no identity: it was written by an older version)"
                    raise OutputExistsError(
                        f"{url} holds the output of run {old_id!r}, not of run {run_id!r}{why}; "
                        "resuming would mix the two, so pass overwrite=True (--overwrite) to delete it and "
                        "start afresh, or choose another url"
                    )
                layout = old_attrs.get("layout", {})
                want = {"height": store.height, "width": store.width, "chunk": store.chunk}
                if {k: layout.get(k) for k in want} != want:
                    raise OutputExistsError(
                        f"{url} holds run {run_id!r} with layout {layout}, not {want}; "
                        "pass overwrite=True (--overwrite) to delete it and start afresh"
                    )
                store._ensure_arrays()
                return store
            if kind == "foreign":
                raise OutputExistsError(
                    f"{url} exists and is not a zarr store; refusing to write or delete it "
                    "(choose another url)"
                )
            if not overwrite:  # a zarr hierarchy we did not write, or one half created
                raise OutputExistsError(
                    f"{url} holds a zarr hierarchy that is not an anomaly_dask output store of "
                    f"run {run_id!r}; pass overwrite=True (--overwrite) to delete it and start afresh"
                )
        if existing is not None:
            fs.rm(path, recursive=True)
            fs.invalidate_cache()

        group_attrs = {
            **user_attrs,
            _FORMAT_KEY: _FORMAT_VERSION,
            "run_id": run_id,
            "complete": False,
            "layout": {"height": store.height, "width": store.width, "chunk": store.chunk},
        }
        if ident is not None:
            group_attrs["identity"] = ident
        zarr.open_group(url, mode="w-", zarr_format=3, attributes=group_attrs, **store._zarr_kwargs())
        store._ensure_arrays()
        return store

    def _ensure_arrays(self) -> None:
        """Create the nodes that are missing (after a crash during creation); check the rest."""
        group = self._open_group("r+")
        try:
            zarr.open_group(self.url, path=_DONE_DIR, mode="r", zarr_format=3, **self._zarr_kwargs())
        except FileNotFoundError:
            # a (childless) zarr group, so that zarr lists the marker folder as a member quietly
            group.create_group(_DONE_DIR, attributes={"description": _DONE_DESCRIPTION})
        for name in ARRAY_NAMES:
            shape: tuple[int, ...] = (self.height, self.width)
            chunks: tuple[int, ...] = (self.chunk, self.chunk)
            dims: tuple[str, ...] = ("y", "x")
            if name == "overlay":
                shape, chunks, dims = shape + (3,), chunks + (3,), dims + ("band",)
            try:
                arr = zarr.open_array(self.url, path=name, mode="r", zarr_format=3, **self._zarr_kwargs())
            except FileNotFoundError:
                group.create_array(
                    name, shape=shape, chunks=chunks, dtype=_DTYPES[name], fill_value=0,
                    dimension_names=dims, config={"write_empty_chunks": True},
                )  # fmt: skip
                continue
            if arr.shape != shape or arr.chunks != chunks or arr.dtype != _DTYPES[name]:
                raise OutputExistsError(
                    f"{self.url}/{name} has shape {arr.shape}, chunks {arr.chunks}, dtype {arr.dtype}; "
                    f"expected {shape}, {chunks}, {_DTYPES[name]}; pass overwrite=True to start afresh"
                )

    # ---- progress -------------------------------------------------------------------------

    def _marker(self, iy: int, ix: int) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = self._fs()
        return fs, _join(path, _DONE_DIR, f"{iy}.{ix}")

    def is_done(self, iy: int, ix: int) -> bool:
        """Whether chunk ``(iy, ix)`` has been written completely by this run.

        Parameters
        ----------
        iy, ix : int
            Chunk row and column.

        Returns
        -------
        bool
            True when the completion marker exists and holds this run's id.
        """
        self.chunk_bounds(iy, ix)
        fs, marker = self._marker(iy, ix)
        try:
            return fs.cat_file(marker) == self.run_id.encode()
        except FileNotFoundError:
            return False

    def done_chunks(self) -> set[tuple[int, int]]:
        """The chunks marked done, from one listing of ``<url>/_done/``.

        Returns
        -------
        set of (int, int)
            Chunk indices ``(iy, ix)``; markers that are truncated or outside the grid are
            ignored.
        """
        fs, path = self._fs()
        done_dir = _join(path, _DONE_DIR)
        fs.invalidate_cache(done_dir)
        try:
            entries = fs.ls(done_dir, detail=True)
        except FileNotFoundError:
            return set()
        size = len(self.run_id.encode())
        done = set()
        for entry in entries:
            match = _MARKER_RE.match(entry["name"].rstrip("/").rsplit("/", 1)[-1])
            if match is None or entry.get("type") == "directory" or entry.get("size") != size:
                continue
            iy, ix = int(match.group(1)), int(match.group(2))
            if iy < self.n_rows and ix < self.n_cols:
                done.add((iy, ix))
        return done

    def missing_chunks(self) -> list[tuple[int, int]]:
        """The chunks not yet done, row-major (one listing)."""
        done = self.done_chunks()
        return [c for c in self.all_chunks() if c not in done]

    # ---- writing --------------------------------------------------------------------------

    def write_chunk(self, iy: int, ix: int, score: np.ndarray, mask: np.ndarray, overlay: np.ndarray) -> None:
        """Write the results of chunk ``(iy, ix)``, then mark it done.

        Safe to call concurrently for different chunks from any process: each call writes
        exactly one zarr chunk per array. The marker is written last, so a crash leaves the
        chunk not done (and it is rewritten on resume).

        Parameters
        ----------
        iy, ix : int
            Chunk row and column.
        score : numpy.ndarray
            (h, w) scores, cast to float32; (h, w) is the chunk's size (see
            :meth:`chunk_bounds`).
        mask : numpy.ndarray
            (h, w) mask, cast to uint8 (booleans become 0/255).
        overlay : numpy.ndarray
            (h, w, 3) uint8 RGB.

        Raises
        ------
        ParameterError
            If an array has the wrong shape or the index is outside the grid.
        """
        y0, y1, x0, x1 = self.chunk_bounds(iy, ix)
        hw = (y1 - y0, x1 - x0)
        mask = np.asarray(mask)
        if mask.dtype == bool:
            mask = mask.astype(np.uint8) * np.uint8(255)
        data = {
            "score": np.asarray(score, dtype=np.float32),
            "mask": np.asarray(mask, dtype=np.uint8),
            "overlay": np.asarray(overlay, dtype=np.uint8),
        }
        for name, arr in data.items():
            want = hw + (3,) if name == "overlay" else hw
            if arr.shape != want:
                raise ParameterError(f"{name} of chunk ({iy}, {ix}) must have shape {want}, got {arr.shape}")
        for name, arr in data.items():
            self._open_array(name, "r+")[y0:y1, x0:x1] = arr
        fs, marker = self._marker(iy, ix)
        if _is_local(fs):
            fs.makedirs(fs._parent(marker), exist_ok=True)
        fs.pipe_file(marker, self.run_id.encode())

    def finalize(self, summary: Mapping[str, Any] | None = None) -> None:
        """Mark the store complete and store ``summary``, once every chunk is done.

        Parameters
        ----------
        summary : dict, optional
            JSON-serialisable run summary (timings, statistics, ...), stored as the group
            attribute ``summary``.

        Raises
        ------
        OutputIncompleteError
            If some chunks are not done; the store is left as it is (not complete).
        OutputExistsError
            If the store now belongs to another run.
        """
        summary = dict(summary or {})
        _check_json(summary, "summary")
        missing = self.missing_chunks()
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise OutputIncompleteError(
                f"{self.url}: {len(missing)} of {self.n_chunks} chunks are not done ({shown}); "
                "write them (resume the run) before finalize"
            )
        group = self._open_group("r+")
        if group.attrs.get("run_id") != self.run_id:
            raise OutputExistsError(
                f"{self.url} now holds run {group.attrs.get('run_id')!r}, not {self.run_id!r}"
            )
        group.attrs.update({"complete": True, "summary": summary})


def _read_group_attrs(store: OutputStore) -> dict[str, Any] | None:
    """Attributes of the zarr group at ``store.url``, or None when there is none."""
    try:
        return dict(store._open_group("r").attrs)
    except (FileNotFoundError, zarr.errors.NodeTypeValidationError):
        return None


def _existing_kind(
    store: OutputStore, fs: fsspec.AbstractFileSystem, path: str
) -> tuple[Literal["ours", "zarr", "foreign"], dict[str, Any]] | None:
    """What is at ``path``: None (nothing), our store, another zarr node, or something else."""
    fs.invalidate_cache()
    if not fs.exists(path):
        return None
    if fs.isfile(path):
        return "foreign", {}
    if fs.exists(_join(path, "zarr.json")):
        attrs = _read_group_attrs(store)
        if attrs is not None and _FORMAT_KEY in attrs:
            return "ours", attrs
        return "zarr", attrs or {}
    if not fs.ls(path, detail=False):
        return None  # an empty folder
    return "foreign", {}


def _check_location(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Raise unless the parent folder exists (local) / is a folder; remote: see _check_writable."""
    if not _is_local(fs):
        return
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        raise OutputLocationError(f"{url}: parent folder {parent} does not exist")


def _check_writable(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """Raise unless ``path`` can be written; remote stores get a tiny probe object (deleted)."""
    if _is_local(fs):
        target = path if os.path.isdir(path) else os.path.dirname(path.rstrip("/")) or "/"
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputNotWritableError(f"{url}: folder {target} is not writable")
        return
    probe = _join(path, f".write-probe-{uuid.uuid4().hex}")
    try:
        fs.pipe_file(probe, b"")
    except FileNotFoundError as err:
        raise OutputLocationError(f"{url}: the bucket or location does not exist ({err})") from err
    except PermissionError as err:
        raise OutputNotWritableError(f"{url}: not writable ({err})") from err
    except Exception as err:  # credentials, endpoint, network, ...: say where it failed
        raise OutputNotWritableError(f"{url}: cannot write there ({type(err).__name__}: {err})") from err
    try:
        fs.rm_file(probe)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


# --------------------------------------------------------------------------------------------
# lease: one store, one writer

#: Seconds between two heartbeats of a held lease.
LEASE_HEARTBEAT_S = 10.0
#: A lease whose heartbeat is older than this many seconds is stale (unless its holder is a
#: process of this host that still runs: that is checked directly).
LEASE_TTL_S = 60.0
_LEASE_FORMAT = "anomaly_dask_lease"
_LEASE_SUFFIX = ".lock"
_LEASE_ATTEMPTS = 5
_HOST = socket.gethostname()


def _process_scope() -> str | None:
    """Kernel boot id and pid namespace (Linux): where a pid means the same process.

    Containers sharing a host name (host networking) have pid namespaces of their own, and
    two machines may share a host name; a pid is only checked when this scope matches.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


_SCOPE = _process_scope()


def _lease_path(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """Filesystem path of the lease of the store at ``path``; None at a bucket's root."""
    stripped = path.rstrip("/")
    if fs.root_marker == "" and "/" not in stripped.strip("/"):
        return None  # s3://bucket itself: a sibling "bucket.lock" would be another bucket
    return stripped + _LEASE_SUFFIX


def lease_url(url: str | os.PathLike[str]) -> str:
    """URL of the lease file of the output store at ``url``: ``<url>.lock``, beside it.

    Parameters
    ----------
    url : str or os.PathLike
        Root of the store.

    Returns
    -------
    str
    """
    return _normalize_url(url) + _LEASE_SUFFIX


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks since boot) of ``pid`` from /proc (Linux)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this host runs; None where that cannot be asked safely."""
    if os.name == "nt":  # os.kill would terminate the process there
        return None
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    except (OverflowError, OSError):
        return False
    stat = _proc_stat(pid)
    return not (stat is not None and stat[0] in "ZX")  # a zombie is dead, only not reaped


def _epoch(value: Any) -> float | None:
    if isinstance(value, _dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _read_lease_file(fs: fsspec.AbstractFileSystem, lock: str) -> tuple[bytes | None, float | None]:
    """Bytes of the lease file and its modification time (None, None when there is none)."""
    fs.invalidate_cache(lock)
    try:
        raw = fs.cat_file(lock)
    except FileNotFoundError:
        return None, None
    try:
        info = fs.info(lock)
    except FileNotFoundError:
        return raw, None
    lowered = {str(k).lower(): v for k, v in info.items()}
    for key in ("mtime", "lastmodified", "last_modified", "updated", "created"):
        t = _epoch(lowered.get(key))
        if t is not None:
            return raw, t
    return raw, None


def _parse_lease(raw: bytes | None) -> dict[str, Any] | None:
    """The record of a lease file, or None when it is empty, partial or not ours."""
    if not raw:
        return None
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _LEASE_FORMAT:
        return None
    return record


def _judge_lease(
    record: dict[str, Any] | None, file_time: float | None, ttl: float, now: float | None = None
) -> tuple[bool, str]:
    """Whether a lease is live, and why (in words)."""
    now = time.time() if now is None else now
    if record is None:  # being written right now, or left half-written by a killed run
        if file_time is not None and now - file_time < ttl:
            return True, "its lease file is being written"
        return False, "its lease file is unreadable and not recent"
    host, pid = record.get("host"), record.get("pid")
    same_scope = host == _HOST and record.get("scope") == _SCOPE
    if same_scope and isinstance(pid, int) and not isinstance(pid, bool):
        alive = _pid_alive(pid)
        if alive is False:
            return False, f"process {pid} on this host ({host}) is gone"
        if alive:
            start, stat = record.get("pid_start"), _proc_stat(pid)
            if start is not None and stat is not None and stat[1] != start:
                return False, f"process {pid} on this host is not the one that took the lease (pid reused)"
            return True, f"process {pid} on this host ({host}) is running"
    beat = _epoch(record.get("heartbeat"))
    if beat is None:
        return False, "its lease records no heartbeat"
    age = now - beat
    if age < ttl:
        return True, f"its last heartbeat was {max(age, 0.0):.0f} s ago"
    return False, f"its last heartbeat was {age:.0f} s ago (more than {ttl:.0f} s)"


def _holder(record: dict[str, Any] | None) -> str:
    if record is None:
        return "an unknown run"
    run = str(record.get("run_id", "?"))
    return (
        f"run {run[:12]} (pid {record.get('pid')} on host {record.get('host')}, "
        f"started {record.get('started_utc')}, last heartbeat {record.get('heartbeat_utc')})"
    )


def _locked_message(url: str, record: dict[str, Any] | None, why: str) -> str:
    return (
        f"{url} is being written by {_holder(record)}: {why}. overwrite=True does not delete "
        f"a store in use either. Wait for that run to finish "
        f"(or stop it), or write to another url. A lease whose holder died is taken over "
        f"automatically once its process is gone (same host) or its heartbeat is older than "
        f"{LEASE_TTL_S:.0f} s; to force it, delete {url}{_LEASE_SUFFIX}."
    )


def read_lease(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The lease of the output store at ``url``, if any, with a verdict on it.

    Parameters
    ----------
    url : str or os.PathLike
        Root of the store.
    storage_options : dict, optional
        fsspec options.

    Returns
    -------
    dict or None
        None when there is no lease file; else the record written by its holder
        (``run_id``, ``host``, ``pid``, ``started``, ``heartbeat``, ...; empty when
        unreadable) plus ``live`` (bool) and ``reason`` (str).
    """
    url = _normalize_url(url)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    lock = _lease_path(fs, path)
    if lock is None:
        return None
    raw, file_time = _read_lease_file(fs, lock)
    if raw is None:
        return None
    record = _parse_lease(raw)
    live, why = _judge_lease(record, file_time, LEASE_TTL_S)
    return {**(record or {}), "live": live, "reason": why}


def _refuse_live_lease(fs: fsspec.AbstractFileSystem, path: str, url: str, own_token: str | None) -> None:
    """Raise OutputLockedError when a live lease of another run guards ``path``."""
    lock = _lease_path(fs, path)
    if lock is None:
        return
    raw, file_time = _read_lease_file(fs, lock)
    if raw is None:
        return
    record = _parse_lease(raw)
    if record is not None and own_token is not None and record.get("token") == own_token:
        return
    live, why = _judge_lease(record, file_time, LEASE_TTL_S)
    if live:
        raise OutputLockedError(_locked_message(url, record, why))


class StoreLease:
    """Exclusive claim of one output store by one run, kept alive by a heartbeat.

    The lease is the file ``<url>.lock`` beside the store (see :func:`lease_url`). It lies
    outside the store so that it can be taken before anything in the store is read,
    created or deleted (``overwrite``), and so that deleting or recreating the store never
    touches it; readers of the store never see it. It holds JSON: ``run_id``, ``token``
    (unique per lease), ``host``, ``scope`` (Linux: boot id and pid namespace), ``pid``,
    ``pid_start`` (Linux: the process's start time, which tells a reused pid apart),
    ``started`` and ``heartbeat`` (Unix times, also as ISO-8601 UTC). A background thread rewrites ``heartbeat`` every ``heartbeat_s``
    seconds; :meth:`release` (also on errors and KeyboardInterrupt when used as a context
    manager) deletes the file.

    A lease found at :meth:`acquire` is *live*, and the call fails with
    :class:`OutputLockedError`, when its holder is a process of this host (same host name
    and scope) that still runs, or, for a holder elsewhere, when its heartbeat is younger
    than ``ttl_s``. Other
    leases are stale (the holder was killed, e.g. ``kill -9``, or its machine died) and are
    taken over, with a warning in the log.

    On a local filesystem the file is created atomically (``O_CREAT | O_EXCL``), so of two
    runs starting together exactly one gets it; a stale lease is first renamed aside (only
    one run's rename succeeds) and checked to be the one judged stale. Heartbeats replace
    the file atomically (``os.replace``) after checking that it is still this lease.

    Limitations: other filesystems (S3, GCS, ...) offer no portable create-if-absent, so
    there the file is written, then read back, and the last writer wins: two runs starting
    within the same moment may both believe they hold it until the next heartbeat, which
    reads the file again; the loser then marks its lease lost, and a caller that checks
    (:meth:`check`; ``detect`` does after every chunk and before marking the store
    complete) stops. Liveness across hosts relies on clocks
    agreeing to well within ``ttl_s``; a process that is alive but hung keeps its lease on
    its own host. Between a heartbeat's check and its write another run could take over;
    the window is a few milliseconds every ``heartbeat_s``.

    Parameters
    ----------
    url : str or os.PathLike
        Root of the store.
    run_id : str
        Id of the run taking the lease (recorded, shown to a refused run).
    storage_options : dict, optional
        fsspec options.
    heartbeat_s : float
        Seconds between heartbeats.
    ttl_s : float
        Age of the heartbeat after which a lease held from another host is stale.

    Raises
    ------
    ParameterError
        For a store at the root of a bucket (put it in a folder: its lease lies beside it).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        run_id: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        heartbeat_s: float = LEASE_HEARTBEAT_S,
        ttl_s: float = LEASE_TTL_S,
    ) -> None:
        if not (heartbeat_s > 0 and ttl_s > heartbeat_s):
            raise ParameterError(f"need 0 < heartbeat_s < ttl_s, got {heartbeat_s}, {ttl_s}")
        self.url = _normalize_url(url)
        self.run_id = str(run_id)
        self.storage_options = dict(storage_options or {})
        self.heartbeat_s = float(heartbeat_s)
        self.ttl_s = float(ttl_s)
        self.token = uuid.uuid4().hex
        self._fs, self._path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        lock = _lease_path(self._fs, self._path)
        if lock is None:
            raise ParameterError(
                f"{self.url} is the root of a bucket; write the output store into a folder of "
                f"it (e.g. {self.url}/out.zarr): its lease file lies beside the store"
            )
        self._lock = lock
        self._started: float | None = None
        self._held = False
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- state ----------------------------------------------------------------------------

    @property
    def lock_url(self) -> str:
        """URL of the lease file."""
        return self.url + _LEASE_SUFFIX

    @property
    def held(self) -> bool:
        """Whether this lease is held (acquired, not released, not lost)."""
        return self._held and self._lost is None

    @property
    def lost(self) -> str | None:
        """Why this lease was lost to another run while held, or None."""
        return self._lost

    def check(self) -> None:
        """Raise unless this lease is still held.

        Raises
        ------
        OutputLockedError
            If the lease was lost to another run, or is not held.
        """
        if self._lost is not None:
            raise OutputLockedError(
                f"{self.url}: this run (run {self.run_id[:12]}) lost its lease: {self._lost}; "
                "the store was not marked complete. Make sure only one run writes it, then "
                "resume."
            )
        if not self._held:
            raise OutputLockedError(f"{self.url}: the lease of run {self.run_id[:12]} is not held")

    def _record(self) -> bytes:
        now = time.time()
        stat = _proc_stat(os.getpid())
        record = {
            "format": _LEASE_FORMAT, "version": 1, "store": self.url, "run_id": self.run_id,
            "token": self.token, "host": _HOST, "scope": _SCOPE, "pid": os.getpid(),
            "pid_start": None if stat is None else stat[1],
            "started": self._started, "started_utc": _iso(self._started),
            "heartbeat": now, "heartbeat_utc": _iso(now),
        }  # fmt: skip
        return json.dumps(record, indent=1, sort_keys=True).encode()

    # ---- taking ---------------------------------------------------------------------------

    def acquire(self) -> StoreLease:
        """Take the lease, or fail because another live run holds it.

        Returns
        -------
        StoreLease
            ``self``, held, its heartbeat thread running.

        Raises
        ------
        OutputLocationError, OutputNotWritableError
            If the store's location does not exist or cannot be written (nothing written).
        OutputLockedError
            If another live run holds the lease (the message names it and what to do).
        """
        if self._held:
            raise ParameterError(f"the lease of {self.url} is already held by this object")
        _check_location(self._fs, self._path, self.url)
        _check_writable(self._fs, self._path, self.url)
        self._started = time.time()
        self._lost = None
        local = _is_local(self._fs)
        for _ in range(_LEASE_ATTEMPTS):
            if self._try_local() if local else self._try_remote():
                break
        else:
            raise OutputLockedError(
                f"{self.url}: could not take the lease {self.lock_url}: other runs kept taking "
                "it at the same time; make sure only one run writes this store"
            )
        self._held = True
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"anomaly_dask-lease-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()
        log.debug("%s: lease taken by run %s", self.url, self.run_id[:12])
        return self

    def _judge_found(self, raw: bytes, file_time: float | None) -> None:
        """Raise for a live lease found in the way; log the takeover of a stale one."""
        record = _parse_lease(raw)
        if record is None and raw.strip() and not raw.lstrip().startswith(b"{"):
            raise OutputLockedError(
                f"{self.url}: {self.lock_url} exists and is not an anomaly_dask lease; "
                "refusing to replace it (move it away, or write the store elsewhere)"
            )
        live, why = _judge_lease(record, file_time, self.ttl_s)
        if live:
            raise OutputLockedError(_locked_message(self.url, record, why))
        log.warning("%s: taking over the stale lease of %s: %s", self.url, _holder(record), why)

    def _try_local(self) -> bool:
        try:
            fd = os.open(self._lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except FileNotFoundError as err:
            raise OutputLocationError(f"{self.url}: cannot create the lease {self._lock} ({err})") from err
        except PermissionError as err:
            raise OutputNotWritableError(f"{self.url}: cannot create the lease {self._lock} ({err})") from err
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
                f.flush()
                os.fsync(f.fileno())
            return True
        raw, file_time = _read_lease_file(self._fs, self._lock)
        if raw is None:
            return False  # released meanwhile: try again
        self._judge_found(raw, file_time)
        aside = f"{self._lock}.stale-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self._lock, aside)  # of several runs taking over, one rename succeeds
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                moved = f.read()
            if moved != raw:  # it changed after it was judged: put it back, judge again
                try:
                    os.link(aside, self._lock)
                except FileExistsError:
                    pass
                except OSError:  # no hard links here
                    if not os.path.exists(self._lock):
                        os.rename(aside, self._lock)
        finally:
            try:
                os.unlink(aside)
            except FileNotFoundError:
                pass
        return False

    def _try_remote(self) -> bool:
        raw, file_time = _read_lease_file(self._fs, self._lock)
        if raw is not None:
            self._judge_found(raw, file_time)
        self._fs.pipe_file(self._lock, self._record())
        back, _ = _read_lease_file(self._fs, self._lock)
        record = _parse_lease(back)
        return record is not None and record.get("token") == self.token

    # ---- keeping --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as err:  # noqa: BLE001 - a network hiccup must not end the run
                log.warning(
                    "%s: lease heartbeat failed (%s: %s); retrying", self.url, type(err).__name__, err
                )
            if self._lost is not None:
                return

    def heartbeat(self) -> None:
        """Refresh the heartbeat now (the background thread does this every ``heartbeat_s``).

        If the lease file now belongs to another run, the lease is marked lost (see
        :attr:`lost`, :meth:`check`) and left alone; if it vanished, it is recreated.
        """
        with self._mutex:
            if not self._held or self._lost is not None:
                return
            raw, _ = _read_lease_file(self._fs, self._lock)
            record = _parse_lease(raw)
            if raw is None:
                log.warning("%s: the lease file %s vanished; taking it again", self.url, self._lock)
                try:
                    again = self._try_local() if _is_local(self._fs) else self._try_remote()
                except OutputLockedError:
                    again = False
                if not again:
                    self._lost = "its lease file vanished and another run took it"
            elif record is None or record.get("token") != self.token:
                self._lost = f"the lease now belongs to {_holder(record)}"
            elif _is_local(self._fs):
                tmp = f"{self._lock}.{self.token[:12]}.tmp"
                with open(tmp, "wb") as f:
                    f.write(self._record())
                os.replace(tmp, self._lock)
            else:
                self._fs.pipe_file(self._lock, self._record())
            if self._lost is not None:
                log.error("%s: run %s lost its lease: %s", self.url, self.run_id[:12], self._lost)

    # ---- giving back ----------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still this lease's.

        Never raises for a failed deletion (it is logged): a leftover lease is stale once
        this process has ended, and is taken over then.
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, 2 * self.heartbeat_s))
        with self._mutex:
            if not self._held:
                return
            self._held = False
            if self._lost is not None:
                return
            try:
                raw, _ = _read_lease_file(self._fs, self._lock)
                record = _parse_lease(raw)
                if record is not None and record.get("token") == self.token:
                    if _is_local(self._fs):
                        os.unlink(self._lock)
                    else:
                        self._fs.rm_file(self._lock)
                    self._fs.invalidate_cache(self._lock)
            except FileNotFoundError:
                pass
            except Exception as err:  # noqa: BLE001 - never mask the run's own outcome
                log.warning(
                    "%s: could not remove the lease %s (%s: %s)",
                    self.url,
                    self._lock,
                    type(err).__name__,
                    err,
                )

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "lost" if self._lost else "held" if self._held else "not held"
        return f"StoreLease({self.url!r}, run {self.run_id[:12]}, {state})"


# --------------------------------------------------------------------------------------------
# exporters


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
        ``<store.url>/png/<name>``.
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
        root = _join(store.url, "png", name)
        # mark png/ as a zarr group so that listing the store's members stays quiet
        zarr.open_group(store.url, path="png", mode="a", zarr_format=3, **store._zarr_kwargs())
    else:
        root = _normalize_url(prefix)
    arr = store.read(name)
    n_rows, n_cols = -(-store.height // tile), -(-store.width // tile)
    fs, root_path = fsspec.core.url_to_fs(root, **store.options)

    def one(ty: int, tx: int) -> str:
        y0, x0 = ty * tile, tx * tile
        pixels = arr[y0 : min(y0 + tile, store.height), x0 : min(x0 + tile, store.width)]
        out = _join(root, str(ty), f"{tx}.png")
        write_png(out, np.ascontiguousarray(pixels), store.options)
        return out

    urls: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for ty in range(n_rows):
            if _is_local(fs):
                fs.makedirs(_join(root_path, str(ty)), exist_ok=True)
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
    write_png(_normalize_url(url_png), out, store.options)
    return oh, ow


# --------------------------------------------------------------------------------------------
# GeoTIFF

_TAG_PIXEL_SCALE = 33550
_TAG_TIEPOINT = 33922
_TAG_TRANSFORMATION = 34264
_TAG_GEOKEYS = 34735
_TAG_GEO_DOUBLE = 34736
_TAG_GEO_ASCII = 34737
_TAG_GDAL_NODATA = 42113
_KEY_MODEL_TYPE = 1024
_KEY_RASTER_TYPE = 1025
_KEY_GEOGRAPHIC = 2048
_KEY_PROJECTED = 3072


def _is_geographic(epsg: int) -> bool:
    return epsg == 4326 or 4000 <= epsg <= 4999


def _geotiff_tags(georef: Mapping[str, Any]) -> list[tuple[int, str, int, Any, bool]]:
    """tifffile ``extratags`` for ``georef`` (raw tags verbatim, else built from transform/EPSG)."""
    tags: list[tuple[int, str, int, Any, bool]] = []
    transform = georef.get("transform")
    if transform is not None:
        transform = tuple(float(v) for v in transform)
        if len(transform) != 6:
            raise ParameterError(f"georef['transform'] must have 6 numbers (GDAL order), got {transform}")
    raw_scale, raw_tie = georef.get("model_pixel_scale"), georef.get("model_tiepoint")
    raw_matrix = georef.get("model_transformation")
    if raw_scale is not None or raw_tie is not None or raw_matrix is not None:
        for code, value in (
            (_TAG_PIXEL_SCALE, raw_scale), (_TAG_TIEPOINT, raw_tie), (_TAG_TRANSFORMATION, raw_matrix)
        ):  # fmt: skip
            if value is not None:
                values = tuple(float(v) for v in value)
                tags.append((code, "d", len(values), values, True))
    elif transform is not None:
        x0, a, b, y0, d, e = transform
        if b == 0 and d == 0 and a > 0 and e < 0:
            tags.append((_TAG_PIXEL_SCALE, "d", 3, (a, -e, 0.0), True))
            tags.append((_TAG_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True))
        else:  # rotated or flipped: full affine matrix
            matrix = (a, b, 0.0, x0, d, e, 0.0, y0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
            tags.append((_TAG_TRANSFORMATION, "d", 16, matrix, True))
    else:
        raise ParameterError("georef needs 'transform' or raw 'model_pixel_scale' + 'model_tiepoint'")

    geokeys = georef.get("geokeys")
    if geokeys is not None:
        keys = tuple(int(v) for v in geokeys)
        tags.append((_TAG_GEOKEYS, "H", len(keys), keys, True))
        doubles = georef.get("geo_double_params")
        if doubles is not None:
            doubles = tuple(float(v) for v in np.atleast_1d(doubles))
            tags.append((_TAG_GEO_DOUBLE, "d", len(doubles), doubles, True))
        ascii_params = georef.get("geo_ascii_params")
        if ascii_params is not None:
            tags.append((_TAG_GEO_ASCII, "s", 0, str(ascii_params), True))
    else:
        epsg = georef.get("crs_epsg")
        if epsg is not None:  # without a CRS no key directory: readers then report no CRS
            epsg = int(epsg)
            if _is_geographic(epsg):
                entries = [
                    (_KEY_MODEL_TYPE, 0, 1, 2),
                    (_KEY_RASTER_TYPE, 0, 1, 1),
                    (_KEY_GEOGRAPHIC, 0, 1, epsg),
                ]
            else:
                entries = [
                    (_KEY_MODEL_TYPE, 0, 1, 1),
                    (_KEY_RASTER_TYPE, 0, 1, 1),
                    (_KEY_PROJECTED, 0, 1, epsg),
                ]
            # header: version 1, revision 1.0, number of keys; then (key, location, count, value)
            directory = (1, 1, 0, len(entries)) + tuple(v for entry in entries for v in entry)
            tags.append((_TAG_GEOKEYS, "H", len(directory), directory, True))
    return tags


def georef_from_tiff(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Read the georeference of a (Geo)TIFF as a ``georef`` dict for :func:`write_geotiff`.

    Only the header is read.

    Parameters
    ----------
    url : str
        The TIFF (local path or fsspec URL).
    storage_options : dict, optional
        fsspec options.

    Returns
    -------
    dict or None
        ``transform`` (GDAL order, or None if not derivable), ``crs_epsg`` (int or None) and
        the raw tags present among ``geokeys``, ``geo_double_params``, ``geo_ascii_params``,
        ``model_pixel_scale``, ``model_tiepoint``, ``model_transformation``; None when the
        file has no georeferencing tags.
    """
    import tifffile

    names = {
        _TAG_GEOKEYS: "geokeys", _TAG_GEO_DOUBLE: "geo_double_params", _TAG_GEO_ASCII: "geo_ascii_params",
        _TAG_PIXEL_SCALE: "model_pixel_scale", _TAG_TIEPOINT: "model_tiepoint",
        _TAG_TRANSFORMATION: "model_transformation",
    }  # fmt: skip
    with fsspec.open(url, "rb", **(storage_options or {})) as f, tifffile.TiffFile(f) as tif:
        page = tif.pages.first
        raw: dict[str, Any] = {}
        for code, key in names.items():
            tag = page.tags.get(code)
            if tag is None:
                continue
            value = tag.value
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            if isinstance(value, str):
                raw[key] = value.rstrip("\x00")
            else:
                raw[key] = [
                    v.item() if isinstance(v, np.generic) else v for v in np.atleast_1d(value).tolist()
                ]
    if not raw:
        return None
    keys: dict[int, int] = {}
    directory = raw.get("geokeys")
    if directory is not None and len(directory) >= 4:
        for i in range(int(directory[3])):
            key, location, _count, value = directory[4 + 4 * i : 8 + 4 * i]
            if location == 0:
                keys[int(key)] = int(value)
    epsg = keys.get(_KEY_PROJECTED) or keys.get(_KEY_GEOGRAPHIC)
    if epsg == 32767:  # user-defined
        epsg = None
    transform = None
    scale, tie, matrix = (
        raw.get("model_pixel_scale"),
        raw.get("model_tiepoint"),
        raw.get("model_transformation"),
    )
    if matrix is not None and len(matrix) >= 8:
        transform = (matrix[3], matrix[0], matrix[1], matrix[7], matrix[4], matrix[5])
    elif scale is not None and tie is not None and len(tie) >= 6:
        sx, sy = float(scale[0]), float(scale[1])
        i, j, x, y = float(tie[0]), float(tie[1]), float(tie[3]), float(tie[4])
        x0, y0 = x - i * sx, y + j * sy
        if keys.get(_KEY_RASTER_TYPE) == 2:  # PixelIsPoint: GDAL shifts by half a pixel
            x0, y0 = x0 - 0.5 * sx, y0 + 0.5 * sy
        transform = (x0, sx, 0.0, y0, 0.0, -sy)
    return {"transform": transform, "crs_epsg": epsg, **raw}


def _tiff_tiles(
    arr: zarr.Array, tile: int, fill: Any, max_band_bytes: int, chunk: int
) -> Iterator[np.ndarray]:
    """Tiles of ``arr`` in TIFF order (row-major), read a band of whole tile rows at a time."""
    height, width = arr.shape[:2]
    extra = arr.shape[2:]
    row_bytes = tile * width * arr.dtype.itemsize * int(np.prod(extra, dtype=np.int64))
    per_band = max(1, min(-(-chunk // tile), max_band_bytes // max(row_bytes, 1)))
    band_rows = tile * per_band
    for b0 in range(0, height, band_rows):
        band = arr[b0 : min(b0 + band_rows, height)]
        for t0 in range(0, band.shape[0], tile):
            rows = band[t0 : t0 + tile]
            for x0 in range(0, width, tile):
                piece = rows[:, x0 : x0 + tile]
                if piece.shape[:2] == (tile, tile):
                    yield np.ascontiguousarray(piece)
                else:
                    full = np.full((tile, tile, *extra), fill, dtype=arr.dtype)
                    full[: piece.shape[0], : piece.shape[1]] = piece
                    yield full


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
) -> None:
    """Write array ``name`` as a tiled GeoTIFF, tile by tile.

    The file is written under a temporary name and moved into place when complete, so no
    partial file ever carries the final name. For a remote ``url_tif`` it is written to a
    local temporary file and uploaded (object stores: straight to the final key, which
    appears only when the upload completes; other filesystems: to a temporary name, then
    moved). A BigTIFF is written when the uncompressed pixels exceed 2 GiB.

    Parameters
    ----------
    store : OutputStore
        The store.
    url_tif : str
        Output file (local path or fsspec URL; the store's storage options are used).
    name : {"mask", "score", "overlay"}
        Array to write (``overlay`` becomes an RGB GeoTIFF).
    georef : dict, optional
        Georeference: ``transform`` (GDAL geotransform ``(x0, px_w, 0, y0, 0, -px_h)``),
        ``crs_epsg`` (int or None), and optionally the raw tags of an input GeoTIFF
        (``geokeys``, ``geo_double_params``, ``geo_ascii_params``, ``model_pixel_scale``,
        ``model_tiepoint``, ``model_transformation``; see :func:`georef_from_tiff`), which
        are written verbatim. Without raw geokeys a GeoKey directory is built from
        ``crs_epsg`` (geographic for EPSG 4326 and 4000-4999, projected otherwise; no
        directory when ``crs_epsg`` is None). None:
        a plain tiled TIFF.
    nodata : float, optional
        Written as the ``GDAL_NODATA`` tag; also the fill of the padding of edge tiles.
    tile : int
        TIFF tile side, a positive multiple of 16.
    compression : str or None
        tifffile compression (``"zlib"``, ``"zstd"``, ``"lzw"``, ...) or None.
    tmp_dir : str, optional
        Local folder for the temporary file of a remote upload (default: the system's).
    max_band_bytes : int
        Most bytes of pixels read at once (at least one row of tiles across the image).
    """
    import tifffile

    if name not in ARRAY_NAMES:
        raise ParameterError(f"name must be one of {ARRAY_NAMES}, got {name!r}")
    if tile < 16 or tile % 16:
        raise ParameterError(f"tile must be a positive multiple of 16, got {tile}")
    arr = store.read(name)
    dtype = arr.dtype
    fill: Any = 0
    tags = _geotiff_tags(georef) if georef is not None else []
    if nodata is not None:
        if dtype.kind in "ui" and not (
            float(nodata).is_integer() and np.iinfo(dtype).min <= nodata <= np.iinfo(dtype).max
        ):
            raise ParameterError(f"nodata {nodata!r} is not representable in {name} ({dtype})")
        fill = nodata
        text = "nan" if isinstance(nodata, float) and math.isnan(nodata) else repr(nodata)
        if dtype.kind in "ui":
            text = str(int(nodata))
        tags.append((_TAG_GDAL_NODATA, "s", 0, text, True))
    bigtiff = store.height * store.width * dtype.itemsize * int(np.prod(arr.shape[2:])) > _BIGTIFF_BYTES

    url_tif = _normalize_url(url_tif)
    fs, path = fsspec.core.url_to_fs(url_tif, **store.options)
    local = _is_local(fs)
    if local and not os.path.isdir(os.path.dirname(path)):
        raise OutputLocationError(f"{url_tif}: parent folder {os.path.dirname(path)} does not exist")
    work_dir = tempfile.mkdtemp(prefix="anomaly_dask_tif_", dir=os.path.dirname(path) if local else tmp_dir)
    try:
        tmp = os.path.join(work_dir, Path(path).name + ".partial")
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            tw.write(
                _tiff_tiles(arr, tile, fill, max_band_bytes, store.chunk),
                shape=arr.shape,
                dtype=dtype,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb" if name == "overlay" else "minisblack",
                planarconfig="contig" if name == "overlay" else None,
                extratags=tags,
                metadata=None,
            )
        if local:
            os.replace(tmp, path)
        elif _is_object_store(fs):
            fs.put_file(tmp, path)
        else:
            fs.put_file(tmp, path + ".partial")
            fs.mv(path + ".partial", path)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
