"""End-to-end behaviour of AnomalyDetector on small images and on the example dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomaly_dask import AnomalyDetector

from .conftest import EXAMPLE, FAST, texture


def test_finds_the_bright_square(fast_model, small_folder, tmp_path):
    results = fast_model.test(str(small_folder / "test"), str(tmp_path / "out"))
    (r,) = results
    mask = np.asarray(Image.open(r["mask_path"]))
    overlay = np.asarray(Image.open(r["overlay_path"]))
    assert mask.shape == (96, 112) and overlay.shape == (96, 112, 3)
    assert set(np.unique(mask)) <= {0, 255}
    assert mask[45:65, 55:75].mean() > 200  # the square is marked
    assert r["anomalous_pixels"] == int((mask > 0).sum())
    assert r["anomalous_fraction"] == pytest.approx(r["anomalous_pixels"] / (96 * 112))
    assert r["max_score"] > fast_model.threshold_
    # overlay is red where masked, the image elsewhere
    sel = mask > 0
    assert overlay[sel][:, 0].mean() > overlay[sel][:, 1].mean() + 50


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16", "P"])
def test_image_modes_give_full_resolution_outputs(mode, tmp_path):
    base = texture(72, 88, 3)
    if mode == "I;16":
        img = Image.fromarray(base[:, :, 0].astype(np.uint16) * 257)
    elif mode == "P":
        img = Image.fromarray(base).convert("P")
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([base, np.full(base.shape[:2], 200, np.uint8)]))
    else:
        img = Image.fromarray(base).convert(mode)
    for name in ("train.png", "val.png", "test.png"):
        img.save(tmp_path / name)
    ad = AnomalyDetector(**FAST).train(str(tmp_path / "train.png"), str(tmp_path / "val.png"))
    if mode == "I;16":
        assert ad.intensity_.high > 1000  # learned from 16-bit data, not 8-bit defaults
    (r,) = ad.test(str(tmp_path / "test.png"), str(tmp_path / "out"))
    assert Image.open(r["mask_path"]).size == (88, 72)
    assert Image.open(r["overlay_path"]).mode == "RGB"


def test_score_image_accepts_arrays_and_paths(fast_model, small_folder):
    path = small_folder / "test" / "test0.png"
    arr = np.asarray(Image.open(path))
    a = fast_model.score_image(str(path))
    np.testing.assert_array_equal(a, fast_model.score_image(arr))
    gray = fast_model.score_image(arr[:, :, 0])
    assert gray.shape == a.shape and gray.dtype == np.float32


def test_without_val_split_is_reproducible(small_folder):
    a = AnomalyDetector(**FAST).train(str(small_folder / "train"))
    b = AnomalyDetector(**FAST).train(str(small_folder / "train"))
    assert a.threshold_ == b.threshold_
    np.testing.assert_array_equal(a.dictionary_.centroids, b.dictionary_.centroids)


def test_single_training_image_is_split_by_regions():
    ad = AnomalyDetector(**FAST).train(texture(256, 256, 4))
    assert np.isfinite(ad.threshold_)


def test_threshold_modes_are_false_alarm_rates_on_calibrated_scores(small_folder):
    train, val = str(small_folder / "train"), str(small_folder / "val")
    z = AnomalyDetector(**{**FAST, "threshold_mode": "zscore", "zscore": 2.0}).train(train, val)
    c = AnomalyDetector(**{**FAST, "threshold_mode": "cdf", "cdf": 0.5}).train(train, val)
    m = AnomalyDetector(**{**FAST, "threshold_mode": "manual", "threshold": 3.5}).train(train, val)
    r = AnomalyDetector(**{**FAST, "false_alarm_rate": 0.02}).train(train, val)
    assert z.false_alarm_rate_ == pytest.approx(0.02275, abs=1e-4)  # Gaussian tail beyond 2
    assert c.threshold_ == pytest.approx(np.log10(2)) and c.false_alarm_rate_ == pytest.approx(0.5)
    assert m.threshold_ == 3.5 and m.false_alarm_rate_ == pytest.approx(10**-3.5)
    assert r.threshold_ == pytest.approx(-np.log10(0.02))
    # the same calibrated scores whatever the rule: the rule only moves the threshold
    image = str(small_folder / "val" / "val0.png")
    np.testing.assert_array_equal(z.score_image(image), r.score_image(image))
    # on the validation image itself, the share marked follows the rate
    scores = r.score_image(image)
    assert (scores >= c.threshold_).mean() == pytest.approx(0.5, abs=0.05)
    assert (scores >= r.threshold_).mean() == pytest.approx(0.02, abs=0.01)


def test_weights_from_a_state_dict_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    ad = AnomalyDetector(**{**FAST, "backbone": "resnet18", "weights": str(path)})
    ad.train(texture(64, 64, 0), texture(64, 64, 1))
    assert ad.weights_id_ == "file:r18.pth"
    ref = torchvision.models.resnet18()
    ref.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(ad.backbone_.stages["layer2"][0].conv1.weight, ref.layer2[0].conv1.weight)


def test_example_dataset_defaults_find_the_cuneiform(tmp_path):
    ad = AnomalyDetector(random_state=0, verbose=0).train(
        str(EXAMPLE / "train"), str(EXAMPLE / "val")
    )
    scores = ad.score_image(str(EXAMPLE / "test" / "test1.png"))
    truth = np.asarray(Image.open(EXAMPLE / "ground_truth" / "test1.png")) > 0
    assert roc_auc_score(truth.ravel(), scores.ravel()) > 0.9
    mask = scores >= ad.threshold_
    assert mask[truth].mean() > 3 * mask[~truth].mean()
