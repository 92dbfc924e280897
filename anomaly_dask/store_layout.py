"""What an output store holds, array by array, in forms other tools read.

Used by :class:`~anomaly_dask.store.OutputStore` when it creates a store. Each data array
carries CF attributes (``long_name``, ``grid_mapping``, ``coordinates``) and its dimension
names (zarr v3 ``dimension_names``, or xarray's ``_ARRAY_DIMENSIONS`` attribute in zarr v2),
so that ``xarray.open_zarr`` gives a Dataset with ``score``, ``mask`` and ``overlay`` on
``y`` / ``x`` coordinates of pixel centres, and rioxarray finds the CRS and the transform
in the CF ``grid_mapping`` variable ``spatial_ref`` (:func:`anomaly_dask.georef.grid_mapping_attrs`).

``score`` is NaN where there is no data and where no chunk has been written yet (its fill
value), so a missing chunk never reads as "normal".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from .georef import GRID_MAPPING, grid_mapping_attrs, pixel_centres

__all__ = ["ARRAY_NAMES", "ArraySpec", "array_specs", "create_arrays", "write_coordinates"]

#: Names of the data arrays of an output store.
ARRAY_NAMES = ("score", "mask", "overlay")


@dataclass(frozen=True)
class ArraySpec:
    """Shape, chunks, type, fill value, dimensions and attributes of one store array."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    dims: tuple[str, ...]
    attrs: dict[str, Any]


def array_specs(height: int, width: int, chunk: int, mapping: dict[str, Any] | None) -> list[ArraySpec]:
    """The data arrays of a store of an ``height`` x ``width`` image in ``chunk`` px chunks.

    Parameters
    ----------
    height, width, chunk : int
        Image size and chunk side in pixels.
    mapping : dict or None
        Attributes of the store's ``spatial_ref`` grid-mapping variable, if it has one: the
        arrays refer to it, and carry its WKT as GDAL's Zarr driver reads it (``_CRS``).

    Returns
    -------
    list of ArraySpec
    """
    common: dict[str, Any] = {}
    if mapping is not None:
        common = {"grid_mapping": GRID_MAPPING, "coordinates": GRID_MAPPING}
        if mapping.get("crs_wkt"):
            common["_CRS"] = {"wkt": mapping["crs_wkt"]}
    plane, tiles = (height, width), (chunk, chunk)
    return [
        ArraySpec("score", plane, tiles, np.dtype(np.float32), float("nan"), ("y", "x"), {
            "long_name": "anomaly score",
            "description": "calibrated: a score s is reached by a share 10**-s of normal pixels; "
                           "NaN where there is no data",
            **common,
        }),
        ArraySpec("mask", plane, tiles, np.dtype(np.uint8), 0, ("y", "x"), {
            "long_name": "anomaly mask",
            "flag_values": [0, 255],
            "flag_meanings": "normal_or_no_data anomalous",
            "description": "255 where score >= the store's threshold; no data where score is NaN",
            **common,
        }),
        ArraySpec("overlay", plane + (3,), tiles + (3,), np.dtype(np.uint8), 0, ("y", "x", "band"), {
            "long_name": "image with the mask blended over it (RGB)",
            **common,
        }),
    ]


def _dims_kwargs(zarr_format: int, dims: tuple[str, ...], attrs: dict[str, Any]) -> dict[str, Any]:
    if zarr_format == 3:
        return {"dimension_names": dims, "attributes": attrs}
    return {"attributes": {**attrs, "_ARRAY_DIMENSIONS": list(dims)}}


def _fill(value: Any, dtype: np.dtype, zarr_format: int) -> Any:
    """The fill value as stored: none for integers in v2, where xarray would mask it out."""
    return None if zarr_format == 2 and np.dtype(dtype).kind in "ui" else value


def create_arrays(group: zarr.Group, specs: list[ArraySpec], zarr_format: int) -> None:
    """Create the arrays of ``specs`` in ``group`` (writing every chunk, empty or not)."""
    for spec in specs:
        group.create_array(
            spec.name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
            fill_value=_fill(spec.fill_value, spec.dtype, zarr_format), config={"write_empty_chunks": True},
            **_dims_kwargs(zarr_format, spec.dims, spec.attrs),
        )  # fmt: skip


def write_coordinates(
    group: zarr.Group, georef: Any, height: int, width: int, zarr_format: int
) -> bool:
    """Write the ``spatial_ref`` grid-mapping variable and the ``x`` / ``y`` coordinates.

    Parameters
    ----------
    group : zarr.Group
        The store's root group.
    georef : Georef or None
        Where the image lies.
    height, width : int
        Image size.
    zarr_format : {2, 3}

    Returns
    -------
    bool
        Whether anything was written (False without a georeference).
    """
    mapping = grid_mapping_attrs(georef)
    if mapping is None:
        return False
    ref = group.create_array(
        GRID_MAPPING, shape=(), dtype=np.int32, fill_value=_fill(0, np.dtype(np.int32), zarr_format),
        **_dims_kwargs(zarr_format, (), mapping),
    )
    ref[...] = 0
    centres = pixel_centres(georef, height, width)
    if centres is not None:
        x, y, x_attrs, y_attrs = centres
        for name, values, attrs in (("x", x, x_attrs), ("y", y, y_attrs)):
            arr = group.create_array(
                name, shape=values.shape, chunks=(min(len(values), 1 << 16),), dtype=np.float64,
                fill_value=float("nan"), **_dims_kwargs(zarr_format, (name,), attrs),
            )  # fmt: skip
            arr[:] = values
    return True
