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
    <url>/png/<name>/<ty>/<tx>.png   PNG tiles (optional, :func:`anomaly_dask.export.write_png_tiles`)
    <url>.lock                 lease of the run writing the store (:class:`StoreLease`)

A run is identified by its run id, a hash of everything that shapes the stored pixels
(:mod:`anomaly_dask.identity`). :meth:`OutputStore.create` resumes a store only for the
same run id; given the identity itself it also records it (attribute ``identity``) and, on
a mismatch, names what differs.

One store has one writer at a time: :class:`StoreLease` claims ``<url>.lock`` beside the
store (created atomically on local disks), refreshes a heartbeat in it while the run lasts
and removes it at the end. A second run, and ``overwrite=True``, are refused while the
lease is live; a lease left by a dead process (or with an old heartbeat) is taken over.

Exporters of a finished store (PNG tiles, quick-look, GeoTIFF) are in :mod:`anomaly_dask.export`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import zarr

from .errors import (
    InputNotFoundError,
    OutputExistsError,
    OutputIncompleteError,
    ParameterError,
)
from .identity import jsonable
from .lease import StoreLease
from .lease_records import refuse_live_lease
from .locations import (
    check_json,
    check_location,
    check_writable,
    is_local,
    is_uri,
    join,
    normalize_url,
    options_key,
)
from .store_checks import FORMAT_KEY, keep_existing, read_group_attrs

log = logging.getLogger("anomaly_dask")

__all__ = ["ARRAY_NAMES", "OutputStore"]

#: Names of the arrays of an output store.
ARRAY_NAMES = ("score", "mask", "overlay")

_DTYPES = {"score": np.dtype(np.float32), "mask": np.dtype(np.uint8), "overlay": np.dtype(np.uint8)}
_FORMAT_VERSION = 1
_RESERVED_ATTRS = ("run_id", "complete", "layout", "summary", "identity", FORMAT_KEY)
_DONE_DIR = "_done"
_DONE_DESCRIPTION = "completion markers <iy>.<ix> of the chunks written, each holding the run id"
_MARKER_RE = re.compile(r"^(\d+)\.(\d+)$")


# --------------------------------------------------------------------------------------------
# helpers


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
        return {"storage_options": self.options} if is_uri(self.url) else {}

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
        url = normalize_url(url)
        probe = cls(url, 1, 1, 1, options_key(storage_options))
        attrs = read_group_attrs(probe)
        if attrs is None or FORMAT_KEY not in attrs:
            raise InputNotFoundError(f"{url}: no anomaly_dask output store here")
        layout = attrs["layout"]
        return cls(
            url, int(layout["height"]), int(layout["width"]), int(layout["chunk"]),
            options_key(storage_options), str(attrs["run_id"]),
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
        check_json(user_attrs, "attrs")
        ident = None if identity is None else jsonable(dict(identity))
        check_json(ident, "identity")
        url = normalize_url(url)
        if lease is not None and lease.url != url:
            raise ParameterError(f"lease is of {lease.url}, not of {url}")
        store = cls(url, int(height), int(width), int(chunk), options_key(storage_options), run_id)
        fs, path = store._fs()

        check_location(fs, path, url)
        check_writable(fs, path, url)
        refuse_live_lease(fs, path, url, None if lease is None else lease.token)
        if keep_existing(store, fs, path, run_id, ident, overwrite):
            store._ensure_arrays()
            return store

        group_attrs = {
            **user_attrs,
            FORMAT_KEY: _FORMAT_VERSION,
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
        return fs, join(path, _DONE_DIR, f"{iy}.{ix}")

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
        done_dir = join(path, _DONE_DIR)
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
        if is_local(fs):
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
        check_json(summary, "summary")
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
