"""Completion markers of an output store, kept beside its zarr hierarchy.

``<url>.done/<iy>.<ix>`` says that chunk ``(iy, ix)`` has its scores;
``<url>.done/render-<rid>/<iy>.<ix>`` that its mask and overlay are drawn with rendering
``rid``. Each marker holds the run id, so a marker of another run (or a truncated one)
never counts. Used by :class:`~anomaly_dask.store.OutputStore`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import fsspec

from .locations import join

if TYPE_CHECKING:
    from .store import OutputStore

__all__ = ["clear_progress", "drop_other_renderings", "listed_markers", "marker_path", "progress_url"]

_MARKER_RE = re.compile(r"^(\d+)\.(\d+)$")
_RENDER_PREFIX = "render-"


def progress_url(url: str) -> str:
    """Folder of the completion markers of the store at ``url`` (beside it)."""
    return url.rstrip("/") + ".done"


def _folder(store: OutputStore, rendering: str | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(progress_url(store.url), **store.options)
    return fs, (path if rendering is None else join(path, _RENDER_PREFIX + rendering))


def marker_path(
    store: OutputStore, iy: int, ix: int, rendering: str | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path of the marker of chunk ``(iy, ix)`` (of ``rendering``, if given)."""
    fs, folder = _folder(store, rendering)
    return fs, join(folder, f"{iy}.{ix}")


def listed_markers(store: OutputStore, rendering: str | None) -> set[tuple[int, int]]:
    """Chunks with a marker of this run, from one listing of the folder."""
    fs, folder = _folder(store, rendering)
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return set()
    size = len(store.run_id.encode())
    done = set()
    for entry in entries:
        match = _MARKER_RE.match(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        if match is None or entry.get("type") == "directory" or entry.get("size") != size:
            continue
        iy, ix = int(match.group(1)), int(match.group(2))
        if iy < store.n_rows and ix < store.n_cols:
            done.add((iy, ix))
    return done


def drop_other_renderings(store: OutputStore, rendering: str) -> None:
    """Delete the markers of every rendering but ``rendering``."""
    fs, path = _folder(store, None)
    fs.invalidate_cache(path)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return
    for name in names:
        leaf = name.rstrip("/").rsplit("/", 1)[-1]
        if leaf.startswith(_RENDER_PREFIX) and leaf != _RENDER_PREFIX + rendering:
            fs.rm(name, recursive=True)


def clear_progress(store: OutputStore) -> None:
    """Delete every marker of the store's location (before a fresh store is made there)."""
    fs, path = _folder(store, None)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)
