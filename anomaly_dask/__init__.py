"""anomaly_dask: find visual anomalies in very large images with CNN tile features on Dask.

A distributed re-implementation of the CNN self-similarity detector of Napoletano, Piccoli
and Schettini (Sensors 2018): learn a dictionary of normal tile features from anomaly-free
images, then score every pixel of new images by its distance to that dictionary.
"""

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
