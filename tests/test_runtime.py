"""The trunk's runtime: OpenVINO gives torch's feature maps, scores and masks; chunked ==
unchunked with it; it is compiled once per model and process; bad requests are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from anomaly_dask import AnomalyDetector, runtimes
from anomaly_dask.backbones import build_backbone, fold_batchnorm
from anomaly_dask.errors import ParameterError
from anomaly_dask.runtimes import dense_maps, resolve_runtime

from .conftest import FAST, texture

pytest.importorskip("openvino")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_openvino_maps_equal_torch_maps_at_any_size(name):
    backbone = fold_batchnorm(build_backbone(name, seed=1)).eval()
    for side in ((96, 128), (136, 200), (96, 128)):  # dynamic shapes, and back
        x = torch.rand(1, 3, *side, generator=torch.Generator().manual_seed(side[1]))
        with torch.inference_mode():
            ref = dense_maps(backbone, x, "torch")
            got = dense_maps(backbone, x, "openvino")
        assert [m.shape for m in got] == [m.shape for m in ref]
        for a, b in zip(got, ref):
            assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))


def test_masks_equal_torch_and_chunked_equals_unchunked_with_openvino():
    train = [texture(160, 176, 1), texture(150, 150, 2)]
    image = texture(203, 157, 3)
    ad = AnomalyDetector(**{**FAST, "runtime": "torch", "false_alarm_rate": 0.05}).train(train[0], train[1])
    fast = copy.copy(ad)
    fast.runtime = "openvino"
    assert ad._feature_config(ad._settings()).runtime == "torch"
    assert fast._feature_config(fast._settings()).runtime == "openvino"
    for det in (ad, fast):
        det.chunk_size = 10_000
    reference, whole = ad.score_image(image), fast.score_image(image)
    span = float(reference.max() - reference.min())
    assert np.abs(whole - reference).max() <= 1e-5 * span
    marked = reference >= ad.threshold_
    assert 0 < marked.sum() and np.array_equal(whole >= ad.threshold_, marked)
    for chunk in (48, 72):
        fast.chunk_size = chunk
        chunked = fast.score_image(image)
        assert np.abs(chunked - whole).max() < 1e-3 * span, chunk


def _maps_match(backbone, x):
    with torch.inference_mode():
        ref, got = dense_maps(backbone, x, "torch"), dense_maps(backbone, x, "openvino")
    return [m.shape for m in got] == [m.shape for m in ref] and all(
        float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max())) for a, b in zip(got, ref)
    )


def test_models_differing_only_in_their_dense_stages_get_their_own_trunk():
    # both keep blocks0-4 with the same weights; only the stages returned differ
    a = fold_batchnorm(build_backbone("efficientnet_lite0", layers=("blocks2", "blocks4"), seed=4)).eval()
    b = fold_batchnorm(build_backbone("efficientnet_lite0", layers=("blocks3", "blocks4"), seed=4)).eval()
    assert repr(a) == repr(b)
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    for backbone in (a, b):
        assert _maps_match(backbone, x)


def test_converted_trunk_is_read_from_the_disk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALY_DASK_CACHE", str(tmp_path))
    runtimes._COMPILED.clear()
    backbone = fold_batchnorm(build_backbone("efficientnet_lite0", seed=5)).eval()
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    assert _maps_match(backbone, x)
    files = sorted(p.name for p in (tmp_path / "openvino").iterdir())
    assert len(files) == 2 and files[0].endswith(".bin") and files[1].endswith(".xml")
    # a later process (nothing compiled in memory) reads it and does not convert
    runtimes._COMPILED.clear()

    def no_conversion(_backbone):
        raise AssertionError("converted although a cached trunk was on disk")

    monkeypatch.setattr(runtimes, "_convert", no_conversion)
    assert _maps_match(backbone, x)


def test_a_cached_trunk_that_gives_other_outputs_is_converted_again(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALY_DASK_CACHE", str(tmp_path))
    runtimes._COMPILED.clear()
    ours = fold_batchnorm(build_backbone("efficientnet_lite0", seed=6)).eval()
    other = fold_batchnorm(build_backbone("efficientnet_lite0", seed=7)).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert _maps_match(other, x)
    cached = next((tmp_path / "openvino").glob("*.xml"))
    # put the other model's converted trunk where ours would be cached
    target = runtimes._cache_path(runtimes._digest(ours))
    for suffix in (".bin", ".xml"):
        target.with_suffix(suffix).write_bytes(cached.with_suffix(suffix).read_bytes())
    runtimes._COMPILED.clear()
    assert _maps_match(ours, x)  # not the other model's maps
    runtimes._COMPILED.clear()
    monkeypatch.setattr(runtimes, "_convert", lambda b: (_ for _ in ()).throw(AssertionError("converted")))
    assert _maps_match(ours, x)  # the file was replaced by ours
    target.with_suffix(".bin").write_bytes(b"truncated")  # unreadable: converted again
    runtimes._COMPILED.clear()
    monkeypatch.undo()
    monkeypatch.setenv("ANOMALY_DASK_CACHE", str(tmp_path))
    assert _maps_match(ours, x)


def test_cache_off_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALY_DASK_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert runtimes.cache_dir() is None
    runtimes._COMPILED.clear()
    backbone = fold_batchnorm(build_backbone("efficientnet_lite0", seed=8)).eval()
    assert _maps_match(backbone, torch.rand(1, 3, 64, 64))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("ANOMALY_DASK_CACHE")
    assert runtimes.cache_dir() == tmp_path / "anomaly_dask"


def test_a_cache_folder_that_cannot_be_written_only_costs_the_conversion(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ANOMALY_DASK_CACHE", str(blocker / "cache"))
    runtimes._COMPILED.clear()
    backbone = fold_batchnorm(build_backbone("efficientnet_lite0", seed=9)).eval()
    assert _maps_match(backbone, torch.rand(1, 3, 64, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_compiled_once_per_model_and_thread_count():
    runtimes._COMPILED.clear()
    backbone = fold_batchnorm(build_backbone("efficientnet_lite0", seed=2)).eval()
    twin = copy.deepcopy(backbone)  # another object holding the same model
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        for b in (backbone, twin, backbone):
            dense_maps(b, x, "openvino")
    assert len(runtimes._COMPILED) == 1


def test_runtime_choice_and_refusals(monkeypatch):
    assert resolve_runtime("auto", "cpu") == "openvino"
    assert resolve_runtime("auto", "cuda:0") == "torch"
    assert resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ParameterError, match="runs on the CPU"):
        resolve_runtime("openvino", "cuda")
    with pytest.raises(ParameterError, match="runtime='onnx'"):
        AnomalyDetector(**{**FAST, "runtime": "onnx"})._settings()
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: False)
    assert resolve_runtime("auto", "cpu") == "torch"
    with pytest.raises(ParameterError, match="pip install openvino"):
        resolve_runtime("openvino", "cpu")
