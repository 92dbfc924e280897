"""Runs on a real multi-process cluster: CLI against ``dask scheduler`` / ``dask worker``
processes, equality with a LocalCluster, a worker killed mid-run, environment check, and the
model travelling once per worker rather than with each task."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import zarr

from anomaly_dask import AnomalyDetector, cli, compute
from anomaly_dask.compute import check_environment, package_versions
from anomaly_dask.datasets import SonarScene, write_tiff
from anomaly_dask.errors import EnvironmentMismatchError

from .conftest import REPO, _free_port

BIN = Path(sys.executable).parent
FAST = ["--weights", "none", "--kmeans-clusters", "8", "--kmeans-trials", "2", "--random-state", "0"]
CHUNK = ["--chunk-size", "128"]


def _cli(*args: str, check: bool = True) -> tuple[int, str]:
    """Run a command through the CLI's ``main`` in this process (a fresh interpreter costs
    seconds of imports; ``test_killed_worker_run_completes`` runs one): exit code, stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main([*args, "-q"])
        except SystemExit as exc:
            code = int(exc.code or 0)
    if check:
        assert code == 0, err.getvalue()
    return code, err.getvalue()


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A ``dask scheduler`` and two single-threaded ``dask worker`` processes (no nanny)."""
    from distributed import Client

    root = tmp_path_factory.mktemp("cluster")
    sched_file = root / "scheduler.json"
    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
             "--no-dashboard", "--scheduler-file", str(sched_file)],
            env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        workers = [
            subprocess.Popen(
                [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard",
                 "--no-nanny", "--host", "127.0.0.1", "--name", f"w{k}"],
                env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for k in range(2)
        ]
        procs += workers
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield {"address": address, "file": str(sched_file), "workers": workers, "root": root}
    finally:
        _kill(procs)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cluster_images")
    out = {}
    for name, (h, w, seed, n) in {"train": (256, 256, 1, 0), "val": (192, 256, 2, 0),
                                   "test": (512, 512, 3, 3)}.items():
        out[name] = str(root / f"{name}.tif")
        write_tiff(out[name], SonarScene(h, w, seed=seed, n_objects=n))
    # folders as an analyst passes them: normal lines to train on, survey lines to score
    for folder, name in (("normal", "train"), ("survey", "test")):
        (root / folder).mkdir()
        shutil.copy(out[name], root / folder / f"{name}.tif")
        out[folder] = str(root / folder)
    out["root"] = str(root)
    return out


@pytest.fixture(scope="module")
def runs(cluster, images) -> dict[str, Path]:
    """train + detect through the CLI (folder inputs) on the remote cluster, and the same
    through the API on the in-process LocalCluster of this session."""
    root = Path(images["root"])
    out: dict[str, Path] = {}
    model = root / "model_remote.safetensors"
    where = ["--scheduler", cluster["address"]]
    _cli("train", images["normal"], "--val", images["val"], "--model", str(model), *FAST,
         "--chunk-size", "128", *where)
    report = ["--performance-report", str(root / "report_remote.html")]
    _cli("detect", str(model), images["survey"], "--output", str(root / "remote"), *CHUNK, *where, *report)
    out.update(remote=root / "remote" / "test.zarr", model_remote=model, report_remote=root / "report_remote.html")
    local = AnomalyDetector(weights=None, kmeans_clusters=8, kmeans_trials=2, random_state=0, chunk_size=128,
                            verbose=0).train(images["train"], images["val"])
    local.save(str(root / "model_local.safetensors"))
    (root / "local").mkdir(exist_ok=True)
    local.detect(images["test"], str(root / "local" / "test.zarr"))
    out.update(local=root / "local" / "test.zarr", model_local=root / "model_local.safetensors")
    return out


def test_remote_cluster_matches_local_cluster(runs):
    a = zarr.open_group(str(runs["remote"]), mode="r")
    b = zarr.open_group(str(runs["local"]), mode="r")
    assert a.attrs["complete"] is True and b.attrs["complete"] is True
    assert a.attrs["threshold"] == pytest.approx(b.attrs["threshold"], rel=1e-5)
    sa, sb = a["score"][:], b["score"][:]
    np.testing.assert_array_equal(np.isnan(sa), np.isnan(sb))
    span = np.nanmax(sb) - np.nanmin(sb)
    assert np.nanmax(np.abs(sa - sb)) <= 1e-5 * max(span, 1.0)
    np.testing.assert_array_equal(a["mask"][:], b["mask"][:])
    assert (runs["remote"].parent / "test_quicklook.png").exists()
    assert runs["report_remote"].stat().st_size > 1000

    def regions(store: Path) -> list[tuple[str, ...]]:
        with open(store.parent / "test_contacts.csv", newline="") as f:
            keys = ("id", "area_px", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")
            return [tuple(row[k] for k in keys) for row in csv.DictReader(f)]

    assert regions(runs["remote"]) == regions(runs["local"]) and regions(runs["local"])


def test_scheduler_file_and_user_errors_on_cluster(cluster, runs, images, tmp_path):
    code, err = _cli("detect", str(runs["model_remote"]), str(tmp_path / "missing.tif"), "--output",
                     str(tmp_path / "o"), "--scheduler-file", cluster["file"], check=False)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anomaly-dask: error: ") and "missing.tif" in lines[0]
    code, err = _cli("detect", str(tmp_path / "nomodel.safetensors"), images["test"], "--output",
                     str(tmp_path / "o"), "--scheduler", cluster["address"], check=False)
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_environment_check(cluster):
    from distributed import Client

    with Client(cluster["address"], timeout=30) as client:
        versions = check_environment(client)
        assert len(versions) == 2
        assert all(v == package_versions() for v in versions.values())
        fake = {**package_versions(), "numpy": "0.0.1"}
        with pytest.raises(EnvironmentMismatchError, match=r"numpy .*client has 0\.0\.1"):
            check_environment(client, local=fake)


def test_model_travels_once_per_worker_not_with_tasks(cluster, runs, images, tmp_path, monkeypatch):
    """Every task's payload is small (< 100 kB) while the model is MBs, and during the run
    each worker holds exactly one copy of the extractor (the scattered model)."""
    from distributed import Client

    sizes: list[int] = []
    copies: list[dict] = []
    real_stream = compute.tasks._stream

    def spy(client, fn, jobs, limit):
        jobs = list(jobs)
        sizes.extend(len(cloudpickle.dumps(args)) for args in jobs)
        return real_stream(client, fn, jobs, limit)

    def count_extractors(dask_worker):
        from anomaly_dask.scoring import Extractor

        return sum(isinstance(v, Extractor) for v in dask_worker.data.values())

    monkeypatch.setattr(compute.tasks, "_stream", spy)
    with Client(cluster["address"], timeout=30) as client:
        ad = AnomalyDetector.load(str(runs["model_remote"]), client=client, chunk_size=128, verbose=0)
        model_bytes = len(cloudpickle.dumps(ad._extractor(ad._settings())))

        def progress(done, total):
            if done == 1:
                copies.append(client.run(count_extractors))

        ad.detect(images["test"], str(tmp_path / "spy.zarr"), quicklook=False, progress=progress)
    assert model_bytes > 1_000_000
    assert sizes and max(sizes) < 100_000, max(sizes)
    assert copies and sorted(copies[0].values()) == [1, 1]


def test_killed_worker_run_completes(cluster, runs, images, tmp_path):
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomaly_dask.cli", "detect", str(runs["model_remote"]), images["test"],
         "--output", str(out), *CHUNK, "--scheduler", cluster["address"], "-q"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        done_dir = out.parent / (out.name + ".done")
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if done_dir.exists() and len(list(done_dir.iterdir())) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before a worker could be killed"
        victim = cluster["workers"][1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        n_at_kill = len(list(done_dir.iterdir()))
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert n_at_kill < 16
    a = zarr.open_group(str(out), mode="r")
    b = zarr.open_group(str(runs["remote"]), mode="r")
    assert a.attrs["complete"] is True
    for name in ("score", "mask", "overlay"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
