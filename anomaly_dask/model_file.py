"""The model file: one safetensors file of arrays plus JSON metadata, hashed, never pickled.

Layout: safetensors tensors ``dictionary.<name>`` (PCA, scaler, centroids, and
``dictionary.calibration.<name>``, the calibration curves) and
``backbone.<name>`` (the backbone layers used), and ``__metadata__`` strings:

``format``          ``"anomaly_dask.model"``
``format_version``  integer as text; files of another version than :data:`FORMAT_VERSION`
                    are refused, naming the version
``config``          JSON: parameters, threshold, intensity map, backbone and weights id
``fingerprint``     sha256 over ``config`` and every tensor's name, dtype, shape and bytes
``signature``       optional: hex Ed25519 signature of the fingerprint (see
                    :mod:`anomaly_dask.signing`); not part of the fingerprint's input
``signer``          with ``signature``: id of the signing key (16 hex digits)

Loading refuses a file larger than :data:`MAX_MODEL_BYTES` before reading it, parses the
header itself and checks the magic and version before safetensors parses the tensors (never
a pickle), then checks the fingerprint and, given trusted keys, the signature before the
config is parsed: a pickle, a truncated file or an edited one is refused before anything is
built from it. The fingerprint is no proof of origin (anyone can recompute it); a signature
checked against trusted keys is.

:func:`check_model` then checks every value of the config and every tensor against what
:class:`~anomaly_dask.AnomalyDetector` writes, so that a crafted file fails with one
:class:`~anomaly_dask.errors.ModelFileError` naming the field instead of steering IO or
running with NaN, wrong-typed or oversized arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from numbers import Integral, Real
from typing import Any

import fsspec
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import ModelFileError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_MODEL_BYTES",
    "check_model",
    "fingerprint",
    "read_model",
    "write_model",
]

FORMAT = "anomaly_dask.model"
FORMAT_VERSION = 3

#: What changed at each format version, for the message that refuses an older file.
_OLDER = {
    1: "uncalibrated scores with per-cluster and near-no-data threshold offsets "
    "(cluster_thresholds / context_thresholds), replaced by calibrated pixel scores in version 2",
    2: "run settings (chunk size, overlay look) stored with the model and no record of the "
    "training images' pixel type, both changed in version 3",
}
#: Largest model file read or written, bytes. A default model weighs about 3 MB (dense
#: EfficientNet-Lite0 stages, a 10 000-row memory); a full ResNet18 in patch mode about
#: 45 MB. The cap leaves room for a large memory coreset while bounding what a hostile
#: file can make a reader allocate (about three times the file while it is checked).
MAX_MODEL_BYTES = 256 * 1024 * 1024
#: Largest safetensors header, bytes (a model's header is some tens of kB).
_MAX_HEADER = 4 * 1024 * 1024


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
    signing_key: Any = None,
) -> str:
    """Write a model file; returns its fingerprint.

    The bytes are assembled in memory and written in one go to a temporary name that is
    then moved into place (where the filesystem supports it), so an interrupted save never
    leaves a file that looks valid.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    config : dict
        JSON-serialisable configuration.
    tensors : dict of str to ndarray
    storage_options : dict, optional
        fsspec options.
    signing_key : str, path-like or Ed25519PrivateKey, optional
        Sign the fingerprint with this key (a PEM private key file or the key object).

    Raises
    ------
    ModelFileError
        The file would be larger than :data:`MAX_MODEL_BYTES` (it could not be loaded).
    ParameterError
        ``signing_key`` is not a readable Ed25519 private key.
    """
    key = None
    if signing_key is not None:
        from .signing import load_private_key

        key = load_private_key(signing_key)
    config_text = json.dumps(config, sort_keys=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    fp = fingerprint(config_text, tensors)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config_text,
        "fingerprint": fp,
    }
    if key is not None:
        from .signing import sign_fingerprint

        meta.update(sign_fingerprint(key, FORMAT, FORMAT_VERSION, fp))
    data = st_save(tensors, metadata=meta)
    if len(data) > MAX_MODEL_BYTES:
        raise ModelFileError(
            f"{url}: the model would take {len(data)} bytes, more than the {MAX_MODEL_BYTES} a model "
            f"file may hold (MAX_MODEL_BYTES); train with a smaller memory_size, pca_variance or "
            f"kmeans_clusters"
        )
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = path + ".partial"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)
    return fp


def _json(text: str | bytes, url: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # ValueError: malformed JSON or an integer of too many digits; RecursionError: nesting
        raise ModelFileError(f"{url}: not an anomaly_dask model (unreadable {what}: {type(err).__name__})") from None


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
    header = _json(data[8 : 8 + n], url, "header")
    if not isinstance(header, dict):
        raise ModelFileError(f"{url}: not an anomaly_dask model (unexpected header)")
    return header


def _read_capped(url: str, storage_options: dict[str, Any] | None) -> bytes:
    """The file's bytes, refusing one over :data:`MAX_MODEL_BYTES` before reading its body."""
    cap = MAX_MODEL_BYTES
    refuse = (
        "{url}: model file of {size} bytes is larger than the {cap} bytes a model may hold "
        "(MAX_MODEL_BYTES); it is refused unread"
    )
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        if fs.isdir(path):
            raise ModelFileError(f"model file {url!r} is a folder")
        size = fs.size(path)  # None where the store does not tell (then at most cap + 1 bytes are read)
        if size is not None and size > cap:
            raise ModelFileError(refuse.format(url=url, size=size, cap=cap))
        with fs.open(path, "rb") as f:
            data = f.read(cap + 1)
    except FileNotFoundError as err:
        raise ModelFileError(f"model file {url!r} does not exist") from err
    if len(data) > cap:
        raise ModelFileError(refuse.format(url=url, size=f"more than {cap}", cap=cap))
    return data


def read_model(
    url: str, storage_options: dict[str, Any] | None = None, trusted_keys: Any = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """Read and verify a model file.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    storage_options : dict, optional
        fsspec options.
    trusted_keys : sequence, optional
        Ed25519 public keys (PEM file paths or key objects). When given, the file must be
        signed by one of them; otherwise a signature is optional.

    Returns
    -------
    config : dict
    tensors : dict of str to ndarray
    fingerprint : str

    Raises
    ------
    ModelFileError
        No such file, larger than :data:`MAX_MODEL_BYTES`, not a model file, a pickle,
        truncated, tampered with, from another version, or (given ``trusted_keys``)
        unsigned, signed by another key or with a signature that does not verify.
    ParameterError
        A trusted key is not a readable Ed25519 public key.
    """
    from .signing import verify_fingerprint

    if isinstance(trusted_keys, (str, bytes)) or hasattr(trusted_keys, "__fspath__"):
        trusted_keys = [trusted_keys]  # one key given alone
    data = _read_capped(url, storage_options)
    header = _header(data, url)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelFileError(f"{url}: not an anomaly_dask model (metadata is not a map of strings)")
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
    del data
    config_text = meta.get("config", "")
    expected = meta.get("fingerprint", "")
    actual = fingerprint(config_text, tensors)
    if actual != expected:
        raise ModelFileError(
            f"{url}: content hash does not match the recorded fingerprint: the file was "
            f"modified or corrupted after it was saved; do not use it"
        )
    verify_fingerprint(meta, trusted_keys, FORMAT, FORMAT_VERSION, actual, url)
    config = _json(config_text, url, "config")
    return config, tensors, actual


# ---------------------------------------------------------------------- schema of a model
#: Fields of a model's config, as :meth:`AnomalyDetector._config` writes them.
CONFIG_FIELDS = (
    "params", "threshold", "false_alarm_rate", "intensity", "input", "backbone", "random_state", "versions",
)
#: Pixel types a model may record for its training images (``"mixed"``: several float / signed).
INPUT_DTYPES = ("uint8", "uint16", "int8", "int16", "uint32", "int32", "float16", "float32", "float64", "mixed")
_INTENSITY_FIELDS = ("low", "high", "gray", "fill")
_BACKBONE_FIELDS = ("name", "weights_id", "layers")
#: Largest calibrated threshold: ``-log10`` of the smallest false-alarm rate used (1e-300).
MAX_THRESHOLD = 300.0


def _cut(text: str, longest: int) -> str:
    return text if len(text) <= longest else text[: longest - 3] + "..."


def _show(value: Any, longest: int = 60) -> str:
    """``repr`` of a value from a file, shortened for a message."""
    return _cut(repr(value), longest)


def _fields(value: Any, expected: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ModelFileError(f"{where}: must be a JSON object, not {type(value).__name__}")
    missing = [k for k in expected if k not in value]
    unknown = sorted(str(k)[:40] for k in value if k not in expected)
    if missing or unknown:
        raise ModelFileError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown[:10]}")
    return value


def _number(value: Any, where: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ModelFileError(f"{where}: {_show(value)} must be a finite number")
    if (value <= low if low_open else value < low) or value > high:
        raise ModelFileError(f"{where}: {_show(value)} is out of range {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _text(value: Any, where: str, longest: int = 1000) -> str:
    if not isinstance(value, str) or len(value) > longest:
        raise ModelFileError(f"{where}: must be a string of at most {longest} characters")
    return value


def _check_params(params: Any, runtime: dict[str, Any]) -> dict[str, Any]:
    from .config import DEFAULTS, RUNTIME, validate
    from .errors import ParameterError

    if not isinstance(params, dict):
        raise ModelFileError(f"config.params: must be a JSON object, not {type(params).__name__}")
    steering = sorted(k for k in params if k in RUNTIME)
    if steering:
        raise ModelFileError(
            f"config.params: holds run setting(s) {steering}, which a model file may not set "
            f"(they choose where and how data are read and written); pass them to load() instead. "
            f"A model saved by an older anomaly_dask holds some of them: retrain it"
        )
    unknown = sorted(str(k)[:40] for k in params if k not in DEFAULTS)
    if unknown:
        raise ModelFileError(f"config.params: unknown parameter(s) {unknown[:10]}")
    if "auto_threshold" in params and not isinstance(params["auto_threshold"], bool):
        raise ModelFileError(f"config.params: auto_threshold={_show(params['auto_threshold'])} must be true or false")
    try:
        return validate({**params, **runtime})
    except ParameterError as err:
        raise ModelFileError(f"config.params: {_cut(str(err), 400)}") from None
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"config.params: invalid value ({_cut(str(err), 400)})") from None


def _check_backbone(bb: dict[str, Any], s: dict[str, Any], tensors: dict[str, np.ndarray]) -> int:
    """Compare the backbone tensors with a skeleton of the named backbone; returns the tile
    feature dimension it produces."""
    import torch

    from .backbones import BACKBONES, build_backbone
    from .calibration import check_array
    from .errors import ParameterError

    name = bb["name"]
    if name not in BACKBONES:
        raise ModelFileError(f"config.backbone.name: {_show(name)} is not one of {sorted(BACKBONES)}")
    if name != s["backbone"]:
        raise ModelFileError(f"config.backbone.name: {_show(name)} differs from config.params.backbone {s['backbone']!r}")
    layers = bb["layers"]
    if (
        not isinstance(layers, list) or not 1 <= len(layers) <= 16 or not all(isinstance(x, str) for x in layers)
        or len(set(layers)) != len(layers)
    ):
        raise ModelFileError("config.backbone.layers: must be a non-empty list of distinct stage names")
    if s["layers"] is not None and list(s["layers"]) != layers:
        raise ModelFileError(f"config.backbone.layers: {_show(layers)} differ from config.params.layers {s['layers']}")
    _text(bb["weights_id"], "config.backbone.weights_id")
    dense = s["features"] == "dense"
    try:
        skeleton = build_backbone(name, None, tuple(layers), dense_only=dense)
    except ParameterError as err:
        raise ModelFileError(f"config.backbone.layers: {err}") from None
    expected = skeleton.state_dict()
    found = {k[len("backbone."):] for k in tensors if k.startswith("backbone.")}
    missing, unknown = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or unknown:
        raise ModelFileError(
            f"backbone.*: tensors do not fit backbone {name!r} with layers {layers}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unknown)} unknown (e.g. {unknown[:3]})"
        )
    for key, ref in expected.items():
        dtype = torch.empty((), dtype=ref.dtype).numpy().dtype
        shape = tuple(ref.shape) if ref.dim() else (1,)  # write_model stores a scalar as (1,)
        check_array(f"backbone.{key}", tensors[f"backbone.{key}"], dtype, shape)
    side = 2 * max(skeleton.stage_strides.values())
    with torch.inference_mode():
        x = torch.zeros(1, 3, side, side)
        if dense:
            return int(sum(m.shape[1] for m in skeleton.forward_dense(x)))
        return int(skeleton.forward_pooled(x).shape[1])


def check_model(
    config: Any, tensors: dict[str, np.ndarray], url: str = "model", runtime: dict[str, Any] | None = None
) -> None:
    """Check a model's config and tensors before anything is built from them.

    Config: a JSON object with exactly :data:`CONFIG_FIELDS`; ``params`` only known
    parameters and no run setting (:data:`~anomaly_dask.params.RUNTIME`), passing
    :func:`~anomaly_dask.params.validate`; ``threshold`` finite in ``[0, MAX_THRESHOLD]``
    and ``false_alarm_rate`` finite in ``(0, 1]``, with ``threshold = -log10(rate)``;
    ``intensity`` ``low`` < ``high`` finite, ``gray`` a bool, ``fill`` in ``[0, 1]``;
    ``backbone`` a known ``name`` (that of ``params``), ``layers`` 1 to 16 distinct stage
    names of it (those of ``params`` when set), ``weights_id`` a string; ``random_state`` None or an integer in
    ``[0, 2**64)``; ``versions`` a small map of strings.

    Tensors: exactly ``dictionary.*`` (see :meth:`Dictionary.check_arrays
    <anomaly_dask.dictionary.Dictionary.check_arrays>`) and ``backbone.*``, the latter
    with the names, dtypes and shapes of a freshly built skeleton of that backbone and
    layers; every float finite; the dictionary's feature dimension that of the backbone;
    at most ``kmeans_clusters`` centroids and at most ``memory_size`` memory rows (a memory
    present exactly when ``memory_size`` > 0).

    Parameters
    ----------
    config : dict
        As returned by :func:`read_model`.
    tensors : dict of str to ndarray
    url : str
        For messages.
    runtime : dict, optional
        Run settings the caller will use (e.g. ``chunk_size``), so that rules relating
        them to the model's parameters are checked with the values that will apply.

    Raises
    ------
    ModelFileError
        One, naming the first field or tensor that breaks a rule.
    """
    from .dictionary import Dictionary

    try:
        cfg = _fields(config, CONFIG_FIELDS, "config")
        s = _check_params(cfg["params"], dict(runtime or {}))
        threshold = _number(cfg["threshold"], "config.threshold", 0.0, MAX_THRESHOLD)
        rate = _number(cfg["false_alarm_rate"], "config.false_alarm_rate", 0.0, 1.0, low_open=True)
        if abs(threshold + math.log10(rate)) > 1e-6 * max(1.0, threshold):
            raise ModelFileError(
                f"config.threshold: {threshold!r} is not -log10(false_alarm_rate={rate!r}) "
                f"= {-math.log10(rate)!r}"
            )
        intensity = _fields(cfg["intensity"], _INTENSITY_FIELDS, "config.intensity")
        low = _number(intensity["low"], "config.intensity.low", -math.inf, math.inf)
        high = _number(intensity["high"], "config.intensity.high", -math.inf, math.inf)
        if not (high > low and math.isfinite(high - low)):
            raise ModelFileError(f"config.intensity.high: {high!r} must exceed low {low!r} (by a finite span)")
        if not isinstance(intensity["gray"], bool):
            raise ModelFileError(f"config.intensity.gray: {_show(intensity['gray'])} must be true or false")
        _number(intensity["fill"], "config.intensity.fill", 0.0, 1.0)
        inp = _fields(cfg["input"], ("dtype",), "config.input")
        if inp["dtype"] not in INPUT_DTYPES:
            raise ModelFileError(f"config.input.dtype: {_show(inp['dtype'])} must be one of {list(INPUT_DTYPES)}")
        seed = cfg["random_state"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**64):
            raise ModelFileError(f"config.random_state: {_show(seed)} must be null or an integer in [0, 2**64)")
        versions = cfg["versions"]
        if not isinstance(versions, dict) or len(versions) > 16:
            raise ModelFileError("config.versions: must be a JSON object of at most 16 entries")
        for key, value in versions.items():
            _text(value, f"config.versions.{str(key)[:40]}", 200)
        bb = _fields(cfg["backbone"], _BACKBONE_FIELDS, "config.backbone")
        unknown = sorted(k[:60] for k in tensors if not k.startswith(("dictionary.", "backbone.")))
        if unknown:
            raise ModelFileError(f"tensors: unknown tensor(s) {unknown[:5]} (only dictionary.* and backbone.*)")
        dim = _check_backbone(bb, s, tensors)
        d = {k[len("dictionary."):]: v for k, v in tensors.items() if k.startswith("dictionary.")}
        try:
            Dictionary.check_arrays(d, feature_dim=dim)
        except ModelFileError as err:
            if "dictionary.pca_mean: shape" in str(err):
                raise ModelFileError(f"{err}; the backbone gives features of dimension {dim}") from None
            raise
        k = len(d["centroids"])
        if k > s["kmeans_clusters"]:
            raise ModelFileError(
                f"dictionary.centroids: {k} centroids, more than config.params.kmeans_clusters={s['kmeans_clusters']}"
            )
        rows = len(d["memory"]) if "memory" in d else 0
        if rows > s["memory_size"] or (rows == 0) != (s["memory_size"] == 0):
            raise ModelFileError(
                f"dictionary.memory: {rows} rows, but config.params.memory_size={s['memory_size']} "
                f"(a memory of 1 to memory_size rows, none when it is 0)"
            )
    except ModelFileError as err:
        raise ModelFileError(f"{url}: {err}") from None
