"""anomaly_dask: find visual anomalies in very large images with CNN tile features on Dask.

A distributed re-implementation of the CNN self-similarity detector of Napoletano, Piccoli
and Schettini (Sensors 2018): learn a dictionary of normal tile features from anomaly-free
images, then score every pixel of new images by its distance to that dictionary.

The names below are imported on first use (module ``__getattr__``), so that importing a
light submodule such as :mod:`anomaly_dask.cli` to print its help does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .detector import AnomalyDetector
    from .errors import (
        AnomalyDaskError,
        GroundTruthError,
        ImageReadError,
        InputNotFoundError,
        ModelFileError,
        NotFittedError,
        OutputError,
        ParameterError,
        WeightsNotFoundError,
    )

__all__ = [
    "AnomalyDaskError",
    "AnomalyDetector",
    "GroundTruthError",
    "ImageReadError",
    "InputNotFoundError",
    "ModelFileError",
    "NotFittedError",
    "OutputError",
    "ParameterError",
    "WeightsNotFoundError",
]

#: The module that defines each public name.
_HOMES = {name: ".errors" for name in __all__ if name.endswith("Error")} | {"AnomalyDetector": ".detector"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anomaly_dask")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "0.1.0+unknown"


__version__ = _version()


def __getattr__(name: str) -> Any:
    """Import ``AnomalyDetector`` and the error classes when first asked for (and
    submodules, as ``anomaly_dask.io`` worked when this package imported them eagerly)."""
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home, __name__), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
