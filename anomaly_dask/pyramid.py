"""A multiscale pyramid of a store's ``score``, described as an OME-Zarr (NGFF) image.

Level 0 is the ``score`` array itself; level ``k`` (``pyramid/<k>``) halves level ``k-1``
in both directions, each pixel the largest score of the 2 x 2 pixels it covers (ignoring
NaN), so an anomaly stays visible when zoomed out. Levels are written one output chunk at
a time from the level below, so memory stays at a few chunks whatever the image size.

The root group gets the NGFF ``multiscales`` metadata: version 0.5 under the ``ome``
attribute for zarr v3 stores, version 0.4 as a top-level attribute for zarr v2. napari's
ome-zarr reader (and ``ome_zarr.reader``) then opens the score as a multiscale image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .store import OutputStore

__all__ = ["PYRAMID_GROUP", "halve", "multiscales", "write_pyramid"]

#: Sub-group of the store that holds levels 1, 2, ...
PYRAMID_GROUP = "pyramid"


def halve(block: np.ndarray) -> np.ndarray:
    """Each 2 x 2 block's largest value, NaN only where all four are NaN.

    Parameters
    ----------
    block : ndarray, shape (h, w)
        Odd sizes are padded with NaN.

    Returns
    -------
    ndarray, shape (ceil(h / 2), ceil(w / 2))
    """
    h, w = block.shape
    if h % 2 or w % 2:
        padded = np.full((h + h % 2, w + w % 2), np.nan, dtype=block.dtype)
        padded[:h, :w] = block
        block = padded
    return np.fmax(np.fmax(block[0::2, 0::2], block[1::2, 0::2]), np.fmax(block[0::2, 1::2], block[1::2, 1::2]))


def level_shapes(height: int, width: int, min_size: int) -> list[tuple[int, int]]:
    """Shapes of levels 1, 2, ... until both sides are at most ``min_size``."""
    shapes = []
    while max(height, width) > min_size:
        height, width = -(-height // 2), -(-width // 2)
        shapes.append((height, width))
    return shapes


def multiscales(n_levels: int, zarr_format: int) -> dict[str, Any]:
    """The NGFF attributes of a score pyramid of ``n_levels`` levels beyond level 0.

    Coordinates are level-0 pixels: level ``k`` has scale ``2**k`` and is shifted by
    ``(2**k - 1) / 2`` so that its pixel centres fall on the centres of what they cover.
    """
    datasets = [{"path": "score", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}]
    for k in range(1, n_levels + 1):
        f = float(2**k)
        datasets.append({
            "path": f"{PYRAMID_GROUP}/{k}",
            "coordinateTransformations": [
                {"type": "scale", "scale": [f, f]},
                {"type": "translation", "translation": [(f - 1) / 2, (f - 1) / 2]},
            ],
        })
    image = {
        "name": "score",
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": datasets,
        "type": "max of 2x2",
    }
    if zarr_format == 3:
        return {"ome": {"version": "0.5", "multiscales": [image]}}
    return {"multiscales": [{"version": "0.4", **image}]}


def write_pyramid(store: OutputStore, min_size: int = 256) -> int:
    """Write the score pyramid of a store whose chunks are all done, and its metadata.

    Parameters
    ----------
    store : OutputStore
        The store.
    min_size : int
        The last level is the first whose sides are both at most this.

    Returns
    -------
    int
        Number of levels written beyond level 0.
    """
    group = store._open_group("r+")
    if PYRAMID_GROUP in group:
        del group[PYRAMID_GROUP]
    levels = group.create_group(PYRAMID_GROUP, attributes={"description": "score at 1/2, 1/4, ... (max of 2x2)"})
    below = store.read("score")
    c = store.chunk
    shapes = level_shapes(store.height, store.width, min_size)
    dims = ("y", "x")
    for k, (h, w) in enumerate(shapes, start=1):
        extra = {"dimension_names": dims} if store.zarr_format == 3 else {}
        attrs = {} if store.zarr_format == 3 else {"_ARRAY_DIMENSIONS": list(dims)}
        level = levels.create_array(
            str(k), shape=(h, w), chunks=(min(c, h), min(c, w)), dtype=np.float32,
            fill_value=float("nan"), attributes=attrs, **extra,
        )  # fmt: skip
        for y0 in range(0, h, c):
            for x0 in range(0, w, c):
                y1, x1 = min(y0 + c, h), min(x0 + c, w)
                level[y0:y1, x0:x1] = halve(np.asarray(below[2 * y0 : 2 * y1, 2 * x0 : 2 * x1]))[: y1 - y0, : x1 - x0]
        below = level
    group.attrs.update(multiscales(len(shapes), store.zarr_format))
    return len(shapes)
