"""Clusters: connect to one or start one, check its environment, size torch's threads.

Part of :mod:`anomaly_dask.compute`, the only package that touches ``distributed``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import ClusterError, EnvironmentMismatchError

__all__ = [
    "CHECKED_PACKAGES",
    "TorchThreads",
    "check_environment",
    "connect",
    "default_task_threads",
    "local_client",
    "package_versions",
    "performance_report",
    "set_torch_threads",
]

#: Packages whose versions must agree between the client and every worker.
CHECKED_PACKAGES = ("anomaly_dask", "torch", "openvino", "numpy", "dask", "distributed", "zarr")


def package_versions() -> dict[str, str]:
    """Versions of :data:`CHECKED_PACKAGES` in this process (``"missing"`` when absent)."""
    out = {}
    for name in CHECKED_PACKAGES:
        try:
            out[name] = _dist_version(name)
        except PackageNotFoundError:
            try:
                out[name] = str(__import__(name).__version__)
            except (ImportError, AttributeError):
                out[name] = "missing"
    return out


def check_environment(client: Any, local: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Compare package versions of the client and every worker; raise on any difference.

    Parameters
    ----------
    client : distributed.Client
    local : dict, optional
        The client's versions (default: :func:`package_versions` here).

    Returns
    -------
    dict
        Worker address -> package versions.

    Raises
    ------
    EnvironmentMismatchError
        Listing each worker, package and the two versions.
    """
    mine = package_versions() if local is None else local
    theirs = client.run(package_versions)
    bad = [
        f"{addr}: {name} {v.get(name, 'missing')} (client has {mine[name]})"
        for addr, v in sorted(theirs.items())
        for name in CHECKED_PACKAGES
        if v.get(name, "missing") != mine[name]
    ]
    if bad:
        raise EnvironmentMismatchError(
            "workers run other package versions than this client: " + "; ".join(bad)
            + "; install the same versions everywhere"
        )
    return theirs


class TorchThreads(WorkerPlugin):
    """Worker plugin: give torch each worker's share of the cores.

    Every task thread of a worker uses ``threads`` torch threads; by default
    ``max(1, cpu_count // nthreads)`` (one worker per machine). Pass ``threads`` when
    several workers share a machine (e.g. ``cpu_count // (n_workers * nthreads)``).

    Parameters
    ----------
    threads : int, optional
        Torch threads per task thread.
    """

    name = "anomaly-dask-torch-threads"
    idempotent = False

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"torch threads={threads} must be >= 1")
        self.threads = threads

    def setup(self, worker: Any) -> None:
        """Record the budget on the worker (read by the tasks) and apply it now."""
        import torch

        n = self.threads or max(1, (os.cpu_count() or 1) // max(1, worker.state.nthreads))
        worker.anomaly_dask_torch_threads = n
        torch.set_num_threads(n)

    def teardown(self, worker: Any) -> None:
        """Nothing to release."""


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    *,
    workers: int = 1,
    threads_per_worker: int | None = None,
    torch_threads: int | None = None,
    timeout: float = 10.0,
    check: bool = True,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` to an existing cluster or to a new LocalCluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``).
    scheduler_file : str, optional
        Scheduler file written by ``dask scheduler --scheduler-file``.
    workers, threads_per_worker : int
        Size of the LocalCluster (worker processes) started when neither is given;
        ``threads_per_worker`` defaults to :func:`default_task_threads`.
    torch_threads : int, optional
        Torch threads per task thread (see :class:`TorchThreads`). For a LocalCluster the
        default shares the cores: ``cpu_count // (workers * threads_per_worker)``.
    timeout : float
        Seconds to wait for an existing scheduler.
    check : bool
        Run :func:`check_environment` before yielding.

    Raises
    ------
    ClusterError
        The scheduler cannot be reached (naming its address) or the file is missing.
    EnvironmentMismatchError
        See :func:`check_environment`.
    """
    from distributed import Client, LocalCluster

    if scheduler and scheduler_file:
        raise ClusterError("give either a scheduler address or a scheduler file, not both")
    if threads_per_worker is None:
        threads_per_worker = default_task_threads(workers)
    if workers < 1 or threads_per_worker < 1:
        raise ClusterError(f"workers={workers} and threads_per_worker={threads_per_worker} must be >= 1")
    with contextlib.ExitStack() as stack:
        if scheduler or scheduler_file:
            if scheduler_file and not os.path.exists(scheduler_file):
                raise ClusterError(f"scheduler file {scheduler_file} does not exist")
            where = scheduler or f"the scheduler in {scheduler_file}"
            try:
                client = Client(scheduler, scheduler_file=scheduler_file, timeout=timeout)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(
                    f"cannot reach {where} within {timeout:g} s ({type(exc).__name__}); "
                    "check the address and that the scheduler is running"
                ) from None
            stack.enter_context(client)
        else:
            if torch_threads is None:
                torch_threads = max(1, (os.cpu_count() or 1) // (workers * threads_per_worker))
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                dashboard_address=":0",
            ))
            client = stack.enter_context(Client(cluster))
        client.register_plugin(TorchThreads(torch_threads), name=TorchThreads.name)
        if check:
            check_environment(client)
        yield client


def default_task_threads(workers: int = 1) -> int:
    """Task threads per worker of a local cluster of ``workers`` workers on this machine
    (:func:`local_client`, :func:`connect`): 2 where each worker has 2 cores or more,
    else 1.

    Two chunks in flight let one task read, pool and score while the other runs the
    trunk, each task's trunk getting half the cores (:func:`set_torch_threads`). On 2
    cores, 16 chunks of a 4096^2 mosaic were scored 1.18-1.43x faster (two runs) than by
    1 task thread using both cores, for 11-14 % more peak memory (``jobs/bench_speed.py``).
    """
    return max(1, min(2, (os.cpu_count() or 1) // max(1, workers)))


@contextlib.contextmanager
def local_client(client: Any | None, threads: int | None = None) -> Iterator[Any]:
    """Yield the client to run on: ``client``, else the process's current distributed
    client, else a LocalCluster client started (and closed) for the block.

    As with ``dask.compute``, a ``distributed.Client`` made in this process (and not
    closed) is used when no ``client`` is passed. Otherwise an in-process cluster is used
    (no worker processes, so a script needs no ``if __name__ == "__main__"`` guard): one
    worker with ``threads`` task threads (default :func:`default_task_threads`) sharing
    one copy of the model, the trunk of each task using its share of the cores.
    """
    from distributed import Client, LocalCluster, default_client

    if client is None:
        try:
            client = default_client()
        except ValueError:  # no current client
            client = None
    if client is not None:
        yield client
        return
    with LocalCluster(
        n_workers=1, threads_per_worker=threads or default_task_threads(), processes=False,
        dashboard_address=":0",
    ) as cluster, Client(cluster) as own:
        yield own


#: BLAS threads last set by :func:`set_torch_threads` in this process (None: never).
_BLAS_THREADS: int | None = None


def set_torch_threads() -> None:
    """Give torch, and BLAS (numpy's matrix products), this task thread's share of the
    worker's cores (before a chunk's work).

    The budget is what :class:`TorchThreads` recorded on the worker, else
    ``cpu_count // worker threads``; outside a worker, all cores.

    BLAS gets the budget explicitly, not whatever threads are free: OpenBLAS rounds a
    product differently with 1 thread than with 2 (the PCA projection of tile features
    moved by about 4e-5), so scores would otherwise depend on how many tasks happen to
    run at once. With it, a model gives the same scores on any layout with the same
    budget per task (tested with 1 and 2 task threads at 1 core each). Its thread count
    is one setting per process, which all task threads of a worker share; they have the
    same budget.
    """
    global _BLAS_THREADS
    import torch

    try:
        from distributed import get_worker

        worker = get_worker()
        nthreads = worker.state.nthreads
        budget = getattr(worker, "anomaly_dask_torch_threads", None)  # set by TorchThreads
    except (ImportError, ValueError):
        nthreads, budget = 1, None
    want = budget or max(1, (os.cpu_count() or 1) // max(1, nthreads))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    if _BLAS_THREADS != want:
        from threadpoolctl import threadpool_limits

        threadpool_limits(want, user_api="blas")
        _BLAS_THREADS = want


def performance_report(filename: str) -> Any:
    """Context manager recording Dask's HTML performance report of the block to ``filename``."""
    from distributed import performance_report as report

    return report(filename=filename)
