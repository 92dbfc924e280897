"""Error hierarchy of anomaly_dask.

Every error raised for a user mistake derives from :class:`AnomalyDaskError` and also from
the builtin a caller would expect (``ValueError``, ``FileNotFoundError``, ``TypeError``), so
``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "AnomalyDaskError",
    "ClusterError",
    "EnvironmentMismatchError",
    "GroundTruthError",
    "ImageReadError",
    "InputNotFoundError",
    "ModelFileError",
    "NotFittedError",
    "OutputError",
    "OutputExistsError",
    "OutputIncompleteError",
    "OutputLocationError",
    "OutputLockedError",
    "OutputNotWritableError",
    "ParameterError",
    "WeightsNotFoundError",
]


class AnomalyDaskError(Exception):
    """Base class of every error raised by anomaly_dask on purpose."""


class ParameterError(AnomalyDaskError, ValueError):
    """A keyword argument has an invalid value; the message names it and the valid range."""


class InputNotFoundError(AnomalyDaskError, FileNotFoundError):
    """An input path does not exist or holds no images."""


class ImageReadError(AnomalyDaskError, ValueError):
    """A file could not be read as an image, or its pixels are unusable (dtype, size, bands)."""


class ModelFileError(AnomalyDaskError, ValueError):
    """A model file is not an anomaly_dask model, is corrupt, tampered with, or incompatible."""


class WeightsNotFoundError(AnomalyDaskError, FileNotFoundError):
    """Pretrained backbone weights were requested but are not on this machine."""


class NotFittedError(AnomalyDaskError, RuntimeError):
    """A detector was used for scoring before ``train`` or ``load``."""


class GroundTruthError(AnomalyDaskError, ValueError):
    """Ground truth is unusable: missing, wrong shape, not binary, or without any anomalous pixel."""


class OutputError(AnomalyDaskError, OSError):
    """An output location cannot be written, or two outputs would get the same name."""


class ClusterError(AnomalyDaskError, ConnectionError):
    """A Dask scheduler could not be reached, or a cluster could not be started."""


class EnvironmentMismatchError(AnomalyDaskError, RuntimeError):
    """Workers run other versions of the packages than the client."""


class OutputExistsError(AnomalyDaskError, FileExistsError):
    """An output store of another run (or something that is not an output store) is in the way."""


class OutputLockedError(OutputExistsError):
    """Another live run holds the lease of the output store (see :class:`anomaly_dask.lease.StoreLease`)."""


class OutputLocationError(InputNotFoundError):
    """The place an output should go does not exist (missing bucket or parent folder)."""


class OutputNotWritableError(AnomalyDaskError, PermissionError):
    """The output location exists but cannot be written."""


class OutputIncompleteError(AnomalyDaskError, RuntimeError):
    """A store was finalized (or exported as finished) while some chunks are not done."""
