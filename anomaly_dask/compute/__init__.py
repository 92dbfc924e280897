"""Everything that touches Dask's distributed scheduler, and nothing else does.

:mod:`.cluster` starts or connects to clusters, checks them and sizes torch's threads;
:mod:`.tasks` ships the model to the workers once, submits the tasks of training, scoring
and detect runs, and streams their results. The estimator plans the work (which chunks of
which images) and calls these; the per-chunk work itself is :mod:`anomaly_dask.scoring`.
"""

from .cluster import (
    CHECKED_PACKAGES,
    TorchThreads,
    check_environment,
    connect,
    default_task_threads,
    local_client,
    package_versions,
    performance_report,
    set_torch_threads,
)
from .tasks import (
    Progress,
    Session,
    detect_chunks,
    fit_model,
    sample_pixel_scores,
    scatter,
    score_array,
    score_blocks,
    session,
    train_dictionary,
)

__all__ = [
    "CHECKED_PACKAGES",
    "Progress",
    "Session",
    "TorchThreads",
    "check_environment",
    "connect",
    "default_task_threads",
    "detect_chunks",
    "fit_model",
    "local_client",
    "package_versions",
    "performance_report",
    "sample_pixel_scores",
    "scatter",
    "score_array",
    "score_blocks",
    "session",
    "set_torch_threads",
    "train_dictionary",
]
