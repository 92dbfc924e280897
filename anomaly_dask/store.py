"""Chunked, resumable output store of a detection run.

A detection run over a huge image writes its results chunk by chunk from Dask workers
into one zarr group (v3, or v2 for older readers), through fsspec (local paths, ``s3://``,
``memory://``, ...). What the arrays hold and the attributes other tools read are in
:mod:`anomaly_dask.store_layout`; the score pyramid in :mod:`anomaly_dask.pyramid`.

A worker writes exactly one zarr chunk of each array, so no locks are needed. Progress is
kept *beside* the zarr hierarchy, so that tools reading the store see only images:

``<url>.done/<iy>.<ix>``
    chunk ``(iy, ix)`` has its score (content: the run id, a hash of everything that shapes
    the scores, :mod:`anomaly_dask.identity`);
``<url>.done/render-<rid>/<iy>.<ix>``
    its mask and overlay are drawn with rendering ``rid`` (threshold and overlay look).

A crashed run is resumed from one listing of each folder; a run at another threshold
redraws masks and overlays from the stored scores without the CNN. :meth:`OutputStore.create`
resumes a store only for the same run id and otherwise names what differs. One store has
one writer at a time (:class:`~anomaly_dask.lease.StoreLease`, ``<url>.lock``). Exporters
(PNG tiles, quick-look, GeoTIFF) are in :mod:`anomaly_dask.export`.
"""

from __future__ import annotations

import logging
import os
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
from .georef import GRID_MAPPING, to_attrs
from .identity import jsonable
from .lease import StoreLease
from .lease_records import refuse_live_lease
from .locations import (
    check_json,
    check_location,
    check_writable,
    is_local,
    is_uri,
    normalize_url,
    options_key,
)
from .store_checks import FORMAT_KEY, keep_existing, read_group_attrs
from .store_layout import ARRAY_NAMES, array_specs, create_arrays, write_coordinates
from .store_progress import clear_progress, drop_other_renderings, listed_markers, marker_path, progress_url

log = logging.getLogger("anomaly_dask")

__all__ = ["ARRAY_NAMES", "ZARR_FORMATS", "OutputStore", "progress_url"]

#: Zarr formats a store can be written in.
ZARR_FORMATS = (2, 3)

_FORMAT_VERSION = 2
_RESERVED_ATTRS = ("run_id", "complete", "layout", "summary", "identity", "rendering", "exports", FORMAT_KEY)
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
    zarr_format : {3, 2}
        Zarr format of the store.
    """

    url: str
    height: int
    width: int
    chunk: int
    storage_options: tuple = field(default=(), repr=False, hash=False)  # may hold dicts; secrets
    run_id: str = ""
    zarr_format: int = 3

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
        arr = zarr.open_array(self.url, path=name, mode=mode, zarr_format=self.zarr_format, **self._zarr_kwargs())
        if mode != "r":
            arr = arr.with_config({"write_empty_chunks": True})
        return arr

    def _open_group(self, mode: Literal["r", "r+"]) -> zarr.Group:
        return zarr.open_group(self.url, mode=mode, zarr_format=self.zarr_format, **self._zarr_kwargs())

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
            options_key(storage_options), str(attrs["run_id"]), int(layout.get("zarr_format", 3)),
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
        zarr_format: int = 3,
        georef: Mapping[str, Any] | None = None,
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
        zarr_format : {3, 2}
            Zarr format (v2 for readers without v3 support, such as GDAL < 3.11).
        georef : Georef, optional
            Where the image lies: recorded as CF / GDAL attributes and x / y coordinates
            (:mod:`anomaly_dask.store_layout`) besides the ``georef`` attribute.

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
        if zarr_format not in ZARR_FORMATS:
            raise ParameterError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
        user_attrs = dict(attrs or {})
        check_json(user_attrs, "attrs")
        ident = None if identity is None else jsonable(dict(identity))
        check_json(ident, "identity")
        url = normalize_url(url)
        if lease is not None and lease.url != url:
            raise ParameterError(f"lease is of {lease.url}, not of {url}")
        store = cls(url, int(height), int(width), int(chunk), options_key(storage_options), run_id, zarr_format)
        fs, path = store._fs()

        check_location(fs, path, url)
        check_writable(fs, path, url)
        refuse_live_lease(fs, path, url, None if lease is None else lease.token)
        if keep_existing(store, fs, path, run_id, ident, overwrite):
            store._ensure_arrays()
            return store
        clear_progress(store)  # markers beside a fresh store are of a deleted one

        group_attrs = {
            **user_attrs,
            FORMAT_KEY: _FORMAT_VERSION,
            "run_id": run_id,
            "complete": False,
            "layout": store.layout,
            **(to_attrs(georef) if georef is not None else {}),
        }
        if ident is not None:
            group_attrs["identity"] = ident
        group = zarr.open_group(url, mode="w-", zarr_format=zarr_format, attributes=group_attrs, **store._zarr_kwargs())
        write_coordinates(group, georef, store.height, store.width, zarr_format)
        store._ensure_arrays()
        return store

    @property
    def layout(self) -> dict[str, int]:
        """Size, chunk side and zarr format, as recorded in the attribute ``layout``."""
        return {"height": self.height, "width": self.width, "chunk": self.chunk, "zarr_format": self.zarr_format}

    def _ensure_arrays(self) -> None:
        """Create the arrays that are missing (after a crash during creation); check the rest."""
        group = self._open_group("r+")
        mapping = dict(group[GRID_MAPPING].attrs) if GRID_MAPPING in group else None
        missing = []
        for spec in array_specs(self.height, self.width, self.chunk, mapping):
            try:
                arr = self._open_array(spec.name, "r")
            except FileNotFoundError:
                missing.append(spec)
                continue
            if arr.shape != spec.shape or arr.chunks != spec.chunks or arr.dtype != spec.dtype:
                raise OutputExistsError(
                    f"{self.url}/{spec.name} has shape {arr.shape}, chunks {arr.chunks}, dtype {arr.dtype}; "
                    f"expected {spec.shape}, {spec.chunks}, {spec.dtype}; pass overwrite=True to start afresh"
                )
        create_arrays(group, missing, self.zarr_format)

    # ---- progress -------------------------------------------------------------------------

    def is_done(self, iy: int, ix: int) -> bool:
        """Whether chunk ``(iy, ix)`` has its scores written by this run.

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
        fs, marker = marker_path(self, iy, ix)
        try:
            return fs.cat_file(marker) == self.run_id.encode()
        except FileNotFoundError:
            return False

    def done_chunks(self) -> set[tuple[int, int]]:
        """The chunks whose scores are written, from one listing of ``<url>.done/``.

        Returns
        -------
        set of (int, int)
            Chunk indices ``(iy, ix)``; markers that are truncated or outside the grid are
            ignored.
        """
        return listed_markers(self, None)

    def rendered_chunks(self, rendering: str) -> set[tuple[int, int]]:
        """The chunks whose mask and overlay are drawn with ``rendering`` (one listing)."""
        return listed_markers(self, rendering) & self.done_chunks()

    def start_rendering(
        self, rendering: str, settings: Mapping[str, Any], attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Make ``rendering`` the store's one rendering: markers of any other are deleted
        (their masks will be redrawn), its ``settings`` and ``attrs`` recorded, and the
        store marked incomplete until finalized."""
        drop_other_renderings(self, rendering)
        self._open_group("r+").attrs.update({
            **jsonable(dict(attrs or {})), "complete": False,
            "rendering": {"id": rendering, **jsonable(dict(settings))},
        })

    def record_exports(self, exports: Mapping[str, str]) -> None:
        """Record the files this store's run wrote beside it (attribute ``exports``)."""
        self._open_group("r+").attrs["exports"] = dict(exports)

    def missing_chunks(self) -> list[tuple[int, int]]:
        """The chunks not yet done, row-major (one listing)."""
        done = self.done_chunks()
        return [c for c in self.all_chunks() if c not in done]

    # ---- writing --------------------------------------------------------------------------

    def write_chunk(
        self, iy: int, ix: int, score: np.ndarray | None, mask: np.ndarray, overlay: np.ndarray,
        rendering: str | None = None,
    ) -> None:
        """Write the results of chunk ``(iy, ix)``, then mark it done.

        Safe to call concurrently for different chunks from any process: each call writes
        exactly one zarr chunk per array. The marker is written last, so a crash leaves the
        chunk not done (and it is rewritten on resume).

        Parameters
        ----------
        iy, ix : int
            Chunk row and column.
        score : numpy.ndarray or None
            (h, w) scores, cast to float32; (h, w) is the chunk's size (see
            :meth:`chunk_bounds`). None redraws a chunk whose scores are written: only the
            mask and overlay are written, then the marker of ``rendering``.
        mask : numpy.ndarray
            (h, w) mask, cast to uint8 (booleans become 0/255).
        overlay : numpy.ndarray
            (h, w, 3) uint8 RGB.
        rendering : str, optional
            Id of the rendering (threshold and look) the mask and overlay were drawn with;
            its marker is written after the score's.

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
            "score": None if score is None else np.asarray(score, dtype=np.float32),
            "mask": np.asarray(mask, dtype=np.uint8),
            "overlay": np.asarray(overlay, dtype=np.uint8),
        }
        data = {k: v for k, v in data.items() if v is not None}
        for name, arr in data.items():
            want = hw + (3,) if name == "overlay" else hw
            if arr.shape != want:
                raise ParameterError(f"{name} of chunk ({iy}, {ix}) must have shape {want}, got {arr.shape}")
        for name, arr in data.items():
            self._open_array(name, "r+")[y0:y1, x0:x1] = arr
        for which in ([None] if score is not None else []) + ([rendering] if rendering else []):
            fs, marker = marker_path(self, iy, ix, which)
            if is_local(fs):
                fs.makedirs(fs._parent(marker), exist_ok=True)
            fs.pipe_file(marker, self.run_id.encode())

    def finalize(self, summary: Mapping[str, Any] | None = None, rendering: str | None = None) -> None:
        """Mark the store complete and store ``summary``, once every chunk is done.

        Parameters
        ----------
        summary : dict, optional
            JSON-serialisable run summary (timings, statistics, ...), stored as the group
            attribute ``summary``.
        rendering : str, optional
            The rendering every chunk must also be drawn with.

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
        if rendering is not None and not missing:
            drawn = self.rendered_chunks(rendering)
            missing = [c for c in self.all_chunks() if c not in drawn]
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
