"""Keyword arguments of :class:`~anomaly_dask.AnomalyDetector`: defaults and validation."""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Any

from .backbones import BACKBONES
from .calibration import GROUPINGS
from .errors import ParameterError

__all__ = ["DEFAULTS", "MAX_CENTROIDS", "MAX_MEMORY", "RUNTIME", "validate"]

#: Every keyword argument with its default. The first block is the seed's, same meaning.
DEFAULTS: dict[str, Any] = {
    # --- the seed's arguments ---
    "tile": 32,
    "tile_height": None,
    "tile_width": None,
    "stride": 8,
    "stride_height": None,
    "stride_width": None,
    "cnn_batchsize": 1024,
    "device": None,
    "pca_variance": 0.95,
    "kmeans_clusters": 50,
    "kmeans_trials": 10,
    "kmeans_random": None,
    "kmeans_neighbors": 1,
    "threshold_mode": None,
    "cdf": 0.95,
    "zscore": 1.645,
    "threshold": None,
    "auto_threshold": True,
    "overlay_color": (255, 0, 0),
    "overlay_opacity": 0.75,
    "verbose": 1,
    "val_fraction": 0.2,
    # --- anomaly_dask's own ---
    "false_alarm_rate": 1e-3,
    "calibration_groups": "centroid",
    "memory_size": 10_000,
    "features": "dense",
    "backbone": "efficientnet_lite0",
    "weights": "imagenet",
    "layers": None,
    "upsample": 2,
    "patch_size": 320,
    "chunk_size": 1024,
    "max_fit_tiles": 100_000,
    "max_train_chunks": 256,
    "nodata": None,
    "random_state": None,
    "client": None,
    "storage_options": None,
}

#: Settings of a run, not of a model: never written to a model file, and a model file that
#: holds one is refused (a file must not steer where data are read or written, or how).
RUNTIME = (
    "client", "storage_options", "device", "verbose", "chunk_size", "cnn_batchsize",
    "overlay_color", "overlay_opacity",
)
#: Caps that keep a model's scoring cost bounded (checked for new models and loaded files).
MAX_CENTROIDS = 20_000
MAX_MEMORY = 200_000

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ParameterError(f"{name}={value!r} must be an integer")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ParameterError(f"{name}={value!r} is out of range; it must be {rng}")
    return int(value)


def _real(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ParameterError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ParameterError(f"{name}={value!r} must be a finite number")
    bad = (value <= low if low_open else value < low) or (value >= high if high_open else value > high)
    if bad:
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise ParameterError(f"{name}={value!r} is out of range; it must be in {lb}{low}, {high}{hb}")
    return float(value)


def _choice(name: str, value: Any, options: list[str]) -> str:
    if value not in options:
        raise ParameterError(f"{name}={value!r} is invalid; choose from {options}")
    return value


def validate(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check every argument and return the resolved settings.

    Resolves per-axis tile and stride, the ``kmeans_random`` alias of ``random_state`` and
    ``auto_threshold=False`` (meaning a manual threshold).

    Raises
    ------
    ParameterError
        Naming the argument, its value and the valid range.
    """
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise ParameterError(f"unknown argument(s) {unknown}; valid ones are {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **kwargs}
    out: dict[str, Any] = dict(p)
    tile = _int("tile", p["tile"])
    stride = _int("stride", p["stride"])
    out["tile_height"] = _int("tile_height", p["tile_height"] if p["tile_height"] is not None else tile)
    out["tile_width"] = _int("tile_width", p["tile_width"] if p["tile_width"] is not None else tile)
    out["stride_height"] = _int(
        "stride_height", p["stride_height"] if p["stride_height"] is not None else stride
    )
    out["stride_width"] = _int("stride_width", p["stride_width"] if p["stride_width"] is not None else stride)
    for axis in ("height", "width"):
        if out[f"stride_{axis}"] > out[f"tile_{axis}"]:
            raise ParameterError(
                f"stride_{axis}={out[f'stride_{axis}']} is larger than tile_{axis}="
                f"{out[f'tile_{axis}']}: tiles would leave pixels unscored; use a stride <= the tile"
            )
    out["cnn_batchsize"] = _int("cnn_batchsize", p["cnn_batchsize"])
    out["pca_variance"] = _real("pca_variance", p["pca_variance"], 0.0, 1.0, True, False)
    out["kmeans_clusters"] = _int("kmeans_clusters", p["kmeans_clusters"], 1, MAX_CENTROIDS)
    out["kmeans_trials"] = _int("kmeans_trials", p["kmeans_trials"])
    out["kmeans_neighbors"] = _int("kmeans_neighbors", p["kmeans_neighbors"], 1, out["kmeans_clusters"])
    if p["threshold_mode"] is not None:
        out["threshold_mode"] = _choice("threshold_mode", p["threshold_mode"], ["cdf", "zscore", "manual"])
    out["false_alarm_rate"] = _real("false_alarm_rate", p["false_alarm_rate"], 0.0, 1.0, True, True)
    out["calibration_groups"] = _choice("calibration_groups", p["calibration_groups"], list(GROUPINGS))
    out["cdf"] = _real("cdf", p["cdf"], 0.0, 1.0, False, False)
    out["zscore"] = _real("zscore", p["zscore"], -40.0, 40.0, False, False)
    if p["threshold"] is not None:
        out["threshold"] = _real("threshold", p["threshold"], 0.0, 300.0, False, False)
    if not p["auto_threshold"]:
        out["threshold_mode"] = "manual"
    if out["threshold_mode"] == "manual" and out["threshold"] is None:
        raise ParameterError(
            "threshold_mode='manual' (or auto_threshold=False) needs threshold=<calibrated score>, "
            "e.g. threshold=3 marks pixels scoring like 1 normal pixel in 1000"
        )
    color = p["overlay_color"]
    if (
        not isinstance(color, (tuple, list))
        or len(color) != 3
        or not all(isinstance(c, Integral) and 0 <= c <= 255 for c in color)
    ):
        raise ParameterError(f"overlay_color={color!r} must be three integers in [0, 255]")
    out["overlay_color"] = tuple(int(c) for c in color)
    out["overlay_opacity"] = _real("overlay_opacity", p["overlay_opacity"], 0.0, 1.0, False, False)
    out["verbose"] = _int("verbose", p["verbose"], 0)
    if p["device"] is not None and (not isinstance(p["device"], str) or not _DEVICE.match(p["device"])):
        raise ParameterError(
            f"device={p['device']!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:<n>' or 'mps'"
        )
    if p["storage_options"] is not None and not isinstance(p["storage_options"], dict):
        raise ParameterError(f"storage_options={p['storage_options']!r} must be a dict of fsspec options")
    out["val_fraction"] = _real("val_fraction", p["val_fraction"], 0.0, 1.0, True, True)
    out["features"] = _choice("features", p["features"], ["dense", "patch"])
    out["backbone"] = _choice("backbone", p["backbone"], sorted(BACKBONES))
    if p["weights"] is not None and not isinstance(p["weights"], str):
        raise ParameterError(
            f"weights={p['weights']!r} must be 'imagenet', None (random) or a path/URL to a state dict"
        )
    if p["layers"] is not None:
        if isinstance(p["layers"], str) or not all(isinstance(x, str) for x in p["layers"]):
            raise ParameterError(f"layers={p['layers']!r} must be a list of stage names")
        out["layers"] = list(p["layers"])
    out["upsample"] = _choice("upsample", p["upsample"], [1, 2, 4])
    out["patch_size"] = _int("patch_size", p["patch_size"], 32)
    out["chunk_size"] = _int("chunk_size", p["chunk_size"], 1)
    for axis in ("height", "width"):
        if out["chunk_size"] < out[f"tile_{axis}"]:
            raise ParameterError(
                f"chunk_size={out['chunk_size']} is smaller than tile_{axis}="
                f"{out[f'tile_{axis}']}; use a chunk of at least one tile"
            )
    out["max_fit_tiles"] = _int("max_fit_tiles", p["max_fit_tiles"], 2)
    out["memory_size"] = _int("memory_size", p["memory_size"], 0, MAX_MEMORY)
    out["max_train_chunks"] = _int("max_train_chunks", p["max_train_chunks"], 1)
    if p["nodata"] is not None:
        nd = p["nodata"]
        if isinstance(nd, Real) and not isinstance(nd, bool) and math.isnan(nd):
            out["nodata"] = float("nan")
        else:
            out["nodata"] = _real("nodata", nd, -1e300, 1e300, False, False)
    seed = p["random_state"] if p["random_state"] is not None else p["kmeans_random"]
    out["random_state"] = None if seed is None else _int("random_state", seed, 0)
    out["kmeans_random"] = out["random_state"]
    return out


def saved_params(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings worth storing in a model file (JSON-serialisable, no runtime handles)."""
    return {k: v for k, v in settings.items() if k not in RUNTIME}
