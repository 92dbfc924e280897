"""Every bad input gives a clear error naming the problem, and no output that looks complete."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomaly_dask import (
    AnomalyDetector,
    ImageReadError,
    InputNotFoundError,
    NotFittedError,
    ParameterError,
    WeightsNotFoundError,
)

from .conftest import FAST, texture


def test_missing_path(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        AnomalyDetector(**FAST).train(str(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="holds no image files"):
        AnomalyDetector(**FAST).train(str(tmp_path / "empty"))


def test_corrupt_png(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(texture(64, 64, 0)).save(good)
    data = good.read_bytes()
    (tmp_path / "bad.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="bad.png.*cannot be read as an image"):
        AnomalyDetector(**FAST).train(str(tmp_path))


def test_non_image_file_is_skipped_in_a_folder_and_refused_alone(tmp_path):
    Image.fromarray(texture(64, 64, 0)).save(tmp_path / "a.png")
    Image.fromarray(texture(64, 64, 1)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="notes.txt"):
        AnomalyDetector(**FAST).train(str(tmp_path))
    with pytest.raises(ImageReadError, match="notes.txt"):
        AnomalyDetector(**FAST).train(str(tmp_path / "notes.txt"))


def test_image_smaller_than_a_tile():
    with pytest.raises(ImageReadError, match="smaller than one tile"):
        AnomalyDetector(**FAST).train(texture(20, 64, 0), texture(64, 64, 1))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(stride=40), "stride_height=40 is larger than tile_height=32"),
        (dict(backbone="vgg99"), "backbone='vgg99' is invalid"),
        (dict(threshold_mode="median"), "threshold_mode='median' is invalid"),
        (dict(threshold_mode="manual"), "needs threshold="),
        (dict(cdf=1.5), r"cdf=1.5 is out of range"),
        (dict(tile=0), "tile=0 is out of range"),
        (dict(kmeans_neighbors=20, kmeans_clusters=8), "kmeans_neighbors=20"),
        (dict(features="pixels"), "features='pixels' is invalid"),
        (dict(upsample=3), "upsample=3 is invalid"),
        (dict(overlay_color=(255, 0)), "overlay_color"),
    ],
)
def test_invalid_parameters(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        AnomalyDetector(**{**FAST, **kwargs}).train(texture(64, 64, 0), texture(64, 64, 1))


def test_unknown_keyword():
    with pytest.raises(ParameterError, match="unknown argument"):
        AnomalyDetector(tiel=32)


def test_wrong_channels_and_dtype():
    with pytest.raises(ImageReadError, match="5 channels"):
        AnomalyDetector(**FAST).train(np.zeros((64, 64, 5), np.uint8))
    with pytest.raises(ImageReadError, match="dtype"):
        AnomalyDetector(**FAST).train(np.zeros((64, 64), bool))


def test_scoring_before_training():
    with pytest.raises(NotFittedError, match="train"):
        AnomalyDetector().score_image(texture(64, 64, 0))


def test_missing_pretrained_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFoundError, match="resnet18-f37072fd.pth.*torch"):
        AnomalyDetector(**{**FAST, "backbone": "resnet18", "weights": "imagenet"}).train(
            texture(64, 64, 0), texture(64, 64, 1)
        )


def test_bad_test_file_leaves_no_output(fast_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(texture(64, 64, 0)).save(src / "a.png")
    (src / "z.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = tmp_path / "out"
    with pytest.raises(ImageReadError, match="z.png"):
        fast_model.test(str(src), str(out))
    assert not out.exists() or not any(out.iterdir())
