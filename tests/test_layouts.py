"""Scores do not depend on how many task threads share a worker, at the same cores per
task: the input magnification rounds alike whatever torch's thread count, and a model
trained and scored on 1 or 2 task threads of 1 core each gives the same arrays, bit for
bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed import Client, LocalCluster

from anomaly_dask import AnomalyDetector
from anomaly_dask.backbones import build_backbone, fold_batchnorm
from anomaly_dask.compute import TorchThreads
from anomaly_dask.datasets import SonarScene, write_tiff
from anomaly_dask.features import dense_tile_features, magnify
from anomaly_dask.grid import TileGrid


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_magnify_samples_as_torch_bilinear(factor):
    v = np.random.default_rng(factor).random((3, 37, 52), dtype=np.float32)
    got = magnify(v, factor)
    ref = F.interpolate(torch.from_numpy(v)[None], scale_factor=factor, mode="bilinear", align_corners=False)[0]
    assert got.shape == (3, 37 * factor, 52 * factor) and got.dtype == np.float32
    # torch derives its weights from float32 source coordinates: equal to rounding
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(magnify(v, 1), v)


def _threads(n: int) -> None:
    torch.set_num_threads(n)


def test_tile_features_do_not_depend_on_torch_threads():
    pytest.importorskip("openvino")
    backbone = fold_batchnorm(build_backbone("efficientnet_lite0", seed=0)).to(memory_format=torch.channels_last)
    grid = TileGrid(304, 304, 32, 32, 8, 8)
    pixels = np.random.default_rng(0).random((304, 304, 3), dtype=np.float32)
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            _threads(n)
            out.append(dense_tile_features(backbone, pixels, (0, 0), (35, 35), grid, 2, "openvino"))
    finally:
        _threads(before)
    np.testing.assert_array_equal(out[0], out[1])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, (h, w, seed, n) in {"train": (256, 256, 1, 0), "val": (192, 256, 2, 0), "test": (384, 384, 3, 2)}.items():
        out[name] = str(root / f"{name}.tif")
        write_tiff(out[name], SonarScene(h, w, seed=seed, n_objects=n))
    return out


def test_training_and_scores_equal_on_one_and_two_task_threads(scenes):
    results = []
    for threads in (1, 2):
        with LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=":0") as c:
            with Client(c) as client:
                client.register_plugin(TorchThreads(1), name=TorchThreads.name)  # 1 core per task
                ad = AnomalyDetector(weights=None, kmeans_clusters=8, kmeans_trials=2, random_state=0,
                                     chunk_size=128, verbose=0, client=client)
                ad.train(scenes["train"], scenes["val"])
                results.append((ad.dictionary_.arrays(), ad.threshold_, ad.score_image(scenes["test"])))
    (a1, t1, s1), (a2, t2, s2) = results
    assert a1.keys() == a2.keys()
    for name in a1:
        np.testing.assert_array_equal(a1[name], a2[name], err_msg=name)
    assert t1 == t2
    assert np.isfinite(s1).any()
    np.testing.assert_array_equal(s1, s2)


def test_calibration_sample_from_features_computed_ahead_equals_the_plain_one(scenes, session_client):
    from anomaly_dask.compute import sample_pixel_scores, scatter
    from anomaly_dask.compute.tasks import _chunk_features_task
    from anomaly_dask.scoring import plan_units

    ad = AnomalyDetector(weights=None, kmeans_clusters=8, kmeans_trials=2, random_state=0, chunk_size=128, verbose=0)
    ad.train(scenes["train"], scenes["val"])
    s = ad._settings()
    source, grid = ad._open(scenes["val"], s)
    units = plan_units(source, grid, 128)
    assert len(units) > 3
    ex, d = scatter(session_client, ad._extractor(s), ad.dictionary_)
    plain = sample_pixel_scores(session_client, ex, d, units, 1, 4)
    ahead = [session_client.submit(_chunk_features_task, ex, u, pure=False) for u in units[:3]]
    early = sample_pixel_scores(session_client, ex, d, units, 1, 4, ahead=ahead)
    assert len(plain[0]) > 1000
    for a, b in zip(plain, early):
        np.testing.assert_array_equal(a, b)
