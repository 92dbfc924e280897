"""Saving and loading a detector: what goes into its model file and how it is rebuilt.

The file format itself (header, fingerprint, signature, checks) is :mod:`anomaly_dask.model_file`.
"""

from __future__ import annotations

from importlib.metadata import version as _pkg_version
from typing import TYPE_CHECKING, Any

import numpy as np

from .backbones import build_backbone
from .calibration import decision_rule
from .config import DEFAULTS, saved_params, validate
from .dictionary import Dictionary
from .features import check_device
from .intensity import Intensity
from .model_file import read_model, write_model

if TYPE_CHECKING:
    from .detector import AnomalyDetector

__all__ = ["content_fingerprint", "load_model", "model_config", "model_tensors", "save_model"]


def content_fingerprint(det: AnomalyDetector) -> str:
    """sha256 of the model's content (as :meth:`save` would record it)."""
    if getattr(det, "fingerprint_", None):
        return det.fingerprint_
    import json

    from .model_file import fingerprint

    tensors = det._tensors()
    return fingerprint(json.dumps(det._config(), sort_keys=True), tensors)


def model_config(det: AnomalyDetector) -> dict[str, Any]:
    """The model file's ``config``: what the model is, never run settings."""
    import torch

    s = det._settings()
    return {
        "params": saved_params(s),
        "threshold": float(det.threshold_),
        "false_alarm_rate": float(det.false_alarm_rate_),
        "intensity": {
            "low": float(det.intensity_.low), "high": float(det.intensity_.high),
            "gray": bool(det.intensity_.gray), "fill": float(det.intensity_.fill),
        },
        "input": {"dtype": det.input_dtype_},
        "backbone": {"name": s["backbone"], "weights_id": det.weights_id_, "layers": list(det.backbone_.dense_stages)},
        "random_state": None if det.random_state_ is None else int(det.random_state_),
        "versions": {"anomaly_dask": _pkg_version("anomaly_dask") if _has_dist() else "dev", "torch": torch.__version__},
    }


def model_tensors(det: AnomalyDetector) -> dict[str, np.ndarray]:
    """The model file's arrays: dictionary and backbone."""
    tensors = {f"dictionary.{k}": v for k, v in det.dictionary_.arrays().items()}
    tensors.update(
        {f"backbone.{k}": v.detach().cpu().numpy() for k, v in det.backbone_.state_dict().items()}
    )
    return tensors


def save_model(det: AnomalyDetector, path: str, storage_options: dict[str, Any] | None = None, signing_key: Any = None) -> str:
    """Write ``det`` to one safetensors file; see :meth:`AnomalyDetector.save`."""
    det._check_fitted()
    det.fingerprint_ = write_model(
        path, det._config(), det._tensors(), storage_options or det.storage_options,
        signing_key=signing_key,
    )
    return det.fingerprint_


def load_model(
    klass: type[AnomalyDetector],
    path: str,
    storage_options: dict[str, Any] | None = None,
    trusted_keys: Any = None,
    **overrides: Any,
) -> AnomalyDetector:
    """Build a detector of class ``klass`` from a model file; see :meth:`AnomalyDetector.load`."""
    import torch

    from .config import RUNTIME
    from .model_file import check_model

    # The caller's own settings are checked first, so that their errors are not
    # blamed on the file (they are ParameterErrors, not ModelFileErrors).
    validate({k: v for k, v in overrides.items() if k in RUNTIME or k not in DEFAULTS})
    check_device(overrides.get("device"))
    config, tensors, fp = read_model(path, storage_options, trusted_keys=trusted_keys)
    check_model(config, tensors, str(path), runtime={k: v for k, v in overrides.items() if k in RUNTIME})
    stored = {k: v for k, v in config["params"].items() if k not in RUNTIME}
    features = stored.get("features", DEFAULTS["features"])
    params = {**stored, **overrides}
    if storage_options is not None and "storage_options" not in overrides:
        params["storage_options"] = storage_options
    det = klass(**params)
    bb = config["backbone"]
    state = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("backbone.")}
    det.backbone_ = build_backbone(bb["name"], state, tuple(bb["layers"]), dense_only=features == "dense")
    d = {k[len("dictionary."):]: v for k, v in tensors.items() if k.startswith("dictionary.")}
    det.dictionary_ = Dictionary.from_arrays(d)
    det.threshold_ = float(config["threshold"])
    det.false_alarm_rate_ = float(config["false_alarm_rate"])
    rule = ("threshold_mode", "false_alarm_rate", "cdf", "zscore", "threshold", "auto_threshold")
    if any(k in overrides for k in rule):
        # scores are calibrated: a new rule needs no retraining
        s = det._settings()
        det.threshold_, det.false_alarm_rate_ = decision_rule(
            s["threshold_mode"], s["false_alarm_rate"], s["cdf"], s["zscore"], s["threshold"]
        )
    det.calibration_summary_ = det.dictionary_.calibration.summary()
    intensity = config["intensity"]
    det.intensity_ = Intensity(
        float(intensity["low"]), float(intensity["high"]), intensity["gray"], float(intensity["fill"])
    )
    det.input_dtype_ = config["input"]["dtype"]
    det.weights_id_ = bb["weights_id"]
    det.random_state_ = config["random_state"]
    det.n_components_ = int(det.dictionary_.pca_components.shape[0])
    det.fingerprint_ = fp
    return det


def _has_dist() -> bool:
    try:
        _pkg_version("anomaly_dask")
        return True
    except Exception:  # noqa: BLE001
        return False
