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
