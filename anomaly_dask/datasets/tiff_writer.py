"""Tiles of a :class:`~anomaly_dask.datasets.sonar.SonarScene` and tiled GeoTIFF files.

The scene is rendered one tile at a time, so files far larger than memory can be written.
The GeoTIFF carries a north-up georeference in the scene's projected CRS and, for pixels,
the no-data value as a ``GDAL_NODATA`` tag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import ParameterError
from .sonar import SonarScene

__all__ = ["iter_tiles", "write_tiff"]

_GEO_KEY_PROJECTED = 1
_GEO_KEY_PIXEL_IS_AREA = 1
_BIGTIFF_BYTES = 2**31  # uncompressed size above which write_tiff writes a BigTIFF

#: Called as ``on_tile(y0, x0, pixels)`` with each unpadded tile.
TileCallback = Callable[[int, int, np.ndarray], None]


def _tile_pixels(scene: SonarScene, kind: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels (``kind="image"``) or uint8 0/255 truth (``kind="truth"``) of one window."""
    if kind == "image":
        return scene.render(*box)
    return scene.truth(*box).astype(np.uint8) * np.uint8(255)


def iter_tiles(
    scene: SonarScene,
    tile: int = 512,
    kind: Literal["image", "truth"] = "image",
    on_tile: TileCallback | None = None,
) -> Iterator[np.ndarray]:
    """Yield full ``(tile, tile)`` tiles of a scene in row-major order, edges padded.

    Parameters
    ----------
    scene : SonarScene
        The scene.
    tile : int
        Tile side in pixels.
    kind : {"image", "truth"}
        Pixels (:attr:`SonarScene.dtype`, padded with nodata) or truth (uint8 0/255, padded 0).
    on_tile : callable, optional
        Called as ``on_tile(y0, x0, pixels)`` with each unpadded tile, in order.

    Yields
    ------
    numpy.ndarray
        One tile.
    """
    if tile < 1:
        raise ParameterError(f"tile must be >= 1, got {tile}")
    if kind not in ("image", "truth"):
        raise ParameterError(f"kind must be 'image' or 'truth', got {kind!r}")
    pad_value = scene.nodata if kind == "image" else 0
    for y0 in range(0, scene.height, tile):
        y1 = min(y0 + tile, scene.height)
        for x0 in range(0, scene.width, tile):
            x1 = min(x0 + tile, scene.width)
            pixels = _tile_pixels(scene, kind, (y0, y1, x0, x1))
            if on_tile is not None:
                on_tile(y0, x0, pixels)
            full = np.full((tile, tile), pad_value, dtype=pixels.dtype)
            full[: y1 - y0, : x1 - x0] = pixels
            yield full


def _geotiff_tags(scene: SonarScene) -> list[tuple[int, str, int, Any, bool]]:
    """GeoTIFF tags placing the mosaic in a projected CRS (north up, square pixels)."""
    citation = f"EPSG:{scene.epsg}|"
    keys = [
        (1, 1, 0, 4),  # header: version 1.1.0, 4 keys
        (1024, 0, 1, _GEO_KEY_PROJECTED),  # GTModelTypeGeoKey
        (1025, 0, 1, _GEO_KEY_PIXEL_IS_AREA),  # GTRasterTypeGeoKey
        (1026, 34737, len(citation), 0),  # GTCitationGeoKey -> GeoAsciiParamsTag
        (3072, 0, 1, scene.epsg),  # ProjectedCSTypeGeoKey
    ]
    directory = tuple(v for key in keys for v in key)
    easting, northing = scene.origin
    return [
        (33550, "d", 3, (scene.pixel_size, scene.pixel_size, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, easting, northing, 0.0), True),
        (34735, "H", len(directory), directory, True),
        (34737, "s", 0, citation, True),
    ]


def write_tiff(
    path: str | Path,
    scene: SonarScene,
    tile: int = 512,
    compression: str | None = "zlib",
    *,
    kind: Literal["image", "truth"] = "image",
    on_tile: TileCallback | None = None,
) -> None:
    """Write a scene as a tiled GeoTIFF, tile by tile (the image is never held whole).

    Parameters
    ----------
    path : str or pathlib.Path
        Output file.
    scene : SonarScene
        The scene.
    tile : int
        Tile side, a multiple of 16.
    compression : str or None
        tifffile compression name (``"zlib"``, ``"zstd"``, ``"lzw"``, ...) or None.
    kind : {"image", "truth"}
        Write the pixels (with a ``GDAL_NODATA`` tag) or the ground truth (uint8 0/255).
    on_tile : callable, optional
        Called as ``on_tile(y0, x0, pixels)`` with each tile as it is written (e.g. to build a
        preview in the same pass).

    Notes
    -----
    A BigTIFF is written when the uncompressed pixels exceed 2 GiB (``_BIGTIFF_BYTES``). The
    georeference is a ModelPixelScale / ModelTiepoint pair with a GeoKey directory naming
    ``scene.epsg``.
    """
    import tifffile

    if tile < 16 or tile % 16:
        raise ParameterError(f"tile must be a positive multiple of 16, got {tile}")
    dtype = np.dtype(scene.dtype if kind == "image" else np.uint8)
    bigtiff = scene.height * scene.width * dtype.itemsize > _BIGTIFF_BYTES
    tags = _geotiff_tags(scene)
    if kind == "image":
        tags.append((42113, "s", 0, str(int(scene.nodata)), True))
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        tw.write(
            iter_tiles(scene, tile, kind, on_tile),
            shape=(scene.height, scene.width),
            dtype=dtype,
            tile=(tile, tile),
            compression=compression,
            photometric="minisblack",
            extratags=tags,
            metadata=None,
        )
