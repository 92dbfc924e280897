"""Image inputs: finding image files, opening them lazily and reading windows.

An :class:`ImageSource` is a small picklable description of one image (a URL or a numpy
array) that reads any rectangle on demand, so a task ships the description and reads only
its window.

Modules, with dependencies pointing one way (each imports only those above it):

``base``
    The source interface, :class:`ArraySource`, storage-option freezing, the per-process
    cache of open files (:func:`clear_cache`), :func:`read_window`, :func:`valid_pixels`.
``pillow``, ``tiff``, ``zarr_source``
    One reader per format: :class:`PILSource` (decoded whole, cached per process),
    :class:`TiffSource` and :class:`ZarrSource` (read tile by tile).
``bit_depth``
    :class:`ScaledSource` and :func:`match_bit_depth`: an input rescaled to the units of
    a model trained at another bit depth.
``dispatch``
    :func:`list_images`, :func:`output_names`, :func:`relative_stem`, :func:`open_source` (picks the reader).

The georeference of TIFF inputs is decoded by :mod:`anomaly_dask.georef`; pixel maths on
values already read (intensity map, no-data fill) lives in :mod:`anomaly_dask.intensity`.
"""

from __future__ import annotations

from .base import (
    RASTER_DTYPES,
    ArraySource,
    ImageSource,
    clear_cache,
    freeze_options,
    read_window,
    thaw_options,
    valid_pixels,
)
from .bit_depth import ScaledSource, match_bit_depth
from .dispatch import (
    IMAGE_EXTENSIONS,
    is_raster,
    is_zarr_folder,
    list_images,
    open_raster,
    open_source,
    output_names,
    relative_stem,
)
from .pillow import PILSource
from .tiff import TIFF_EXTENSIONS, TiffSource
from .zarr_source import ZARR_EXTENSIONS, ZarrSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "RASTER_DTYPES",
    "TIFF_EXTENSIONS",
    "ZARR_EXTENSIONS",
    "ArraySource",
    "ImageSource",
    "PILSource",
    "ScaledSource",
    "TiffSource",
    "ZarrSource",
    "clear_cache",
    "freeze_options",
    "is_raster",
    "is_zarr_folder",
    "list_images",
    "match_bit_depth",
    "open_raster",
    "open_source",
    "output_names",
    "read_window",
    "relative_stem",
    "thaw_options",
    "valid_pixels",
]
