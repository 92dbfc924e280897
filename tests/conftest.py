"""Shared fixtures: small images made on the fly and a quickly trained detector."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from anomaly_dask import AnomalyDetector

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "example_dataset"

#: Fast settings for tests that check mechanics, not quality: random weights, few clusters.
#: Small, quick models. The trunk runs in torch: an OpenVINO conversion costs a second or two
#: per model, and tests/test_runtime.py checks that OpenVINO gives the same scores and masks.
FAST = dict(weights=None, kmeans_clusters=8, kmeans_trials=2, random_state=0, verbose=0, runtime="torch")


def texture(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    """A random-blob texture, uint8 (H, W, channels)."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 8 + 2, width // 8 + 2, channels))
    big = np.kron(small, np.ones((8, 8, 1)))[:height, :width]
    noise = rng.normal(0, 0.08, (height, width, channels))
    return np.clip((big * 0.7 + 0.15 + noise) * 255, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session", autouse=True)
def trunk_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted OpenVINO trunks go to a folder of this run, not the user's cache."""
    import os

    folder = tmp_path_factory.mktemp("trunk-cache")
    old = os.environ.get("ANOMALY_DASK_CACHE")
    os.environ["ANOMALY_DASK_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("ANOMALY_DASK_CACHE", None)
    else:
        os.environ["ANOMALY_DASK_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def session_client() -> Iterator[Any]:
    """One in-process cluster for the whole run, shaped like the one a call without a client
    starts; it is the current client, so every call that passes no ``client`` uses it.
    Tests that need their own cluster (processes, killed workers) pass theirs."""
    from distributed import Client, LocalCluster

    from anomaly_dask.compute import default_task_threads

    threads = default_task_threads()
    with LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


@pytest.fixture
def scheduler_args(session_client: Any) -> list[str]:
    """CLI options that run a command on the session's cluster instead of starting one
    (a LocalCluster of worker processes costs seconds per command)."""
    return ["--scheduler", session_client.scheduler.address]


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (2 images), val/ (1), test/ (1 with a bright square) of 96x112 RGB PNGs."""
    root = tmp_path_factory.mktemp("small")
    for sub, n, seed in (("train", 2, 0), ("val", 1, 10), ("test", 1, 20)):
        (root / sub).mkdir()
        for k in range(n):
            img = texture(96, 112, seed + k)
            if sub == "test":
                img[40:70, 50:80] = 255
            Image.fromarray(img).save(root / sub / f"{sub}{k}.png")
    return root


@pytest.fixture(scope="session")
def fast_model(small_folder: Path) -> AnomalyDetector:
    """A detector trained on ``small_folder`` with :data:`FAST` settings."""
    return AnomalyDetector(**FAST).train(str(small_folder / "train"), str(small_folder / "val"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (dummy credentials in the environment)."""
    moto_server = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3(moto_endpoint: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Storage options for the moto server and a fresh bucket name."""
    s3fs = pytest.importorskip("s3fs")
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": moto_endpoint}}
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(bucket)
    yield options, bucket
