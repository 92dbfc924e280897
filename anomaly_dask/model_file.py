"""The model file: one safetensors file of arrays plus JSON metadata, hashed, never pickled.

Layout: safetensors tensors ``dictionary.<name>`` (PCA, scaler, centroids, and
``dictionary.calibration.<name>``, the calibration curves) and
``backbone.<name>`` (the backbone layers used), and ``__metadata__`` strings:

``format``          ``"anomaly_dask.model"``
``format_version``  integer as text; files of another version than :data:`FORMAT_VERSION`
                    are refused, naming the version
``config``          JSON: parameters, threshold, intensity map, backbone and weights id
``fingerprint``     sha256 over ``config`` and every tensor's name, dtype, shape and bytes

Loading parses the header itself, checks the magic, version and fingerprint, and only then
hands bytes to safetensors: a pickle, a truncated file or an edited one is refused before
anything is built from it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import fsspec
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import ModelFileError

__all__ = ["FORMAT", "FORMAT_VERSION", "fingerprint", "read_model", "write_model"]

FORMAT = "anomaly_dask.model"
FORMAT_VERSION = 2

#: What changed at each format version, for the message that refuses an older file.
_OLDER = {
    1: "uncalibrated scores with per-cluster and near-no-data threshold offsets "
    "(cluster_thresholds / context_thresholds), replaced by calibrated pixel scores in version 2",
}
_MAX_HEADER = 100 * 1024 * 1024


def fingerprint(config: str, tensors: dict[str, np.ndarray]) -> str:
    """sha256 of the config text and every tensor (name, dtype, shape, bytes), sorted."""
    h = hashlib.sha256()
    h.update(config.encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}\0{t.dtype.str}\0{t.shape}\0".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def write_model(
    url: str,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a model file; returns its fingerprint.

    The bytes are assembled in memory and written in one go to a temporary name that is
    then moved into place (where the filesystem supports it), so an interrupted save never
    leaves a file that looks valid.
    """
    config_text = json.dumps(config, sort_keys=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    fp = fingerprint(config_text, tensors)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config_text,
        "fingerprint": fp,
    }
    data = st_save(tensors, metadata=meta)
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = path + ".partial"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)
    return fp


def _header(data: bytes, url: str) -> dict[str, Any]:
    # A safetensors file starts with its header's length, then the JSON header itself.
    looks_safetensors = len(data) >= 9 and data[8:9] == b"{"
    if not looks_safetensors and (data[:1] == b"\x80" or data[:2] == b"PK"):
        raise ModelFileError(
            f"{url}: this is a pickle / torch.save file, not an anomaly_dask model; it is "
            f"refused because loading a pickle runs code. Retrain and save with "
            f"AnomalyDetector.save()"
        )
    if len(data) < 8:
        raise ModelFileError(f"{url}: file is too short to be an anomaly_dask model ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise ModelFileError(
            f"{url}: not an anomaly_dask model, or truncated (header of {n} bytes in a file "
            f"of {len(data)})"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{url}: not an anomaly_dask model (unreadable header)") from err
    if not isinstance(header, dict):
        raise ModelFileError(f"{url}: not an anomaly_dask model (unexpected header)")
    return header


def read_model(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """Read and verify a model file.

    Returns
    -------
    config : dict
    tensors : dict of str to ndarray
    fingerprint : str

    Raises
    ------
    FileNotFoundError
        No file at ``url``.
    ModelFileError
        Not a model file, a pickle, truncated, tampered with, or from a newer version.
    """
    try:
        with fsspec.open(str(url), "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError as err:
        raise ModelFileError(f"model file {url!r} does not exist") from err
    header = _header(data, url)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{url}: a safetensors file, but not an anomaly_dask model")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError as err:
        raise ModelFileError(f"{url}: model file has no valid format_version") from err
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{url}: model format version {version} is newer than this anomaly_dask reads "
            f"({FORMAT_VERSION}); upgrade anomaly_dask"
        )
    if version < FORMAT_VERSION:
        what = _OLDER.get(version, "an unsupported layout")
        raise ModelFileError(
            f"{url}: model format version {version} ({what}) is no longer read by this "
            f"anomaly_dask (version {FORMAT_VERSION}); retrain the model with `anomaly-dask train` "
            f"or AnomalyDetector().train()"
        )
    try:
        tensors = st_load(data)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelFileError(f"{url}: model file is truncated or corrupt ({err})") from err
    config_text = meta.get("config", "")
    expected = meta.get("fingerprint", "")
    actual = fingerprint(config_text, tensors)
    if actual != expected:
        raise ModelFileError(
            f"{url}: content hash does not match the recorded fingerprint: the file was "
            f"modified or corrupted after it was saved; do not use it"
        )
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError as err:  # pragma: no cover - guarded by the hash
        raise ModelFileError(f"{url}: unreadable config") from err
    return config, tensors, actual
