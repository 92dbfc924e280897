"""What is already at an output store's location, and whether a run may resume it.

Used by :meth:`anomaly_dask.store.OutputStore.create`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import fsspec
import zarr

from .errors import OutputExistsError
from .identity import describe_differences
from .locations import join

if TYPE_CHECKING:
    from .store import OutputStore

__all__ = ["FORMAT_KEY", "keep_existing", "read_group_attrs"]

#: Group attribute identifying a store written by :mod:`anomaly_dask.store`.
FORMAT_KEY = "anomaly_dask_output"


def keep_existing(
    store: OutputStore, fs: fsspec.AbstractFileSystem, path: str, run_id: str,
    ident: dict[str, Any] | None, overwrite: bool,
) -> bool:
    """True when the store at ``path`` is this run's to resume; False when the location is
    free (anything there was deleted, as ``overwrite`` allows).

    Raises
    ------
    OutputExistsError
        A store of another run (naming what differs) or another layout without
        ``overwrite``; a zarr hierarchy we did not write without ``overwrite``; anything
        that is not a zarr store (never deleted).
    """
    url = store.url
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
            want = store.layout
            if {k: layout.get(k, 3 if k == "zarr_format" else None) for k in want} != want:
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
    return False



def read_group_attrs(store: OutputStore) -> dict[str, Any] | None:
    """Attributes of the zarr group at ``store.url``, or None when there is none."""
    try:
        kw = store._zarr_kwargs()
        return dict(zarr.open_group(store.url, mode="r", zarr_format=None, **kw).attrs)
    except (FileNotFoundError, zarr.errors.NodeTypeValidationError, zarr.errors.GroupNotFoundError):
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
    if fs.exists(join(path, "zarr.json")) or fs.exists(join(path, ".zgroup")) or fs.exists(join(path, ".zarray")):
        attrs = read_group_attrs(store)
        if attrs is not None and FORMAT_KEY in attrs:
            return "ours", attrs
        return "zarr", attrs or {}
    if not fs.ls(path, detail=False):
        return None  # an empty folder
    return "foreign", {}


