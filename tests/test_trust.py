"""Careless and hostile inputs that must fail early and clearly (issue: trust).

Covers: non-finite parameters, device names, output locations checked before the work,
``test()`` output names, bit depth, nested storage options with Pillow inputs, and the CLI
ending every failure in one line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_dask import AnomalyDetector, ImageReadError, OutputError, ParameterError, cli
from anomaly_dask.config import validate
from anomaly_dask.io import freeze_options, open_source, thaw_options

from .conftest import FAST, texture


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    _, err = capsys.readouterr()
    return code, err


# ------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("name", ["threshold", "zscore", "cdf", "pca_variance", "val_fraction",
                                  "false_alarm_rate", "overlay_opacity"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(name, value):
    with pytest.raises(ParameterError, match=name):
        validate({name: value})


def test_nan_threshold_fails_before_training(small_folder, monkeypatch):
    def boom(*args, **kwargs):  # training must not get as far as opening images
        raise AssertionError("training started")

    from anomaly_dask import training

    monkeypatch.setattr(training, "split_units", boom)
    for kw in ({"threshold_mode": "manual", "threshold": math.nan}, {"zscore": math.nan}, {"cdf": math.nan}):
        with pytest.raises(ParameterError):
            AnomalyDetector(**FAST, **kw).train(str(small_folder / "train"))


@pytest.mark.parametrize("device", ["bogus", "gpu0", "cuda:x", 3])
def test_device_name_is_checked(device):
    with pytest.raises(ParameterError, match="device"):
        validate({"device": device})


def test_missing_gpu_is_refused_before_a_store_exists(fast_model, small_folder, tmp_path):
    out = tmp_path / "out.zarr"
    fast_model.device = "cuda:7"
    try:
        with pytest.raises(ParameterError, match="cuda:7"):
            fast_model.detect(str(small_folder / "test" / "test0.png"), str(out))
    finally:
        fast_model.device = None
    assert not out.exists()


def test_dictionary_caps():
    with pytest.raises(ParameterError, match="kmeans_clusters"):
        validate({"kmeans_clusters": 1_000_000})
    with pytest.raises(ParameterError, match="memory_size"):
        validate({"memory_size": 10**8})


# ------------------------------------------------------------------------ test() outputs
def test_same_names_in_two_folders_stay_apart(fast_model, tmp_path):
    root = tmp_path / "in"
    for sub, seed in (("a", 1), ("b", 2)):
        (root / sub).mkdir(parents=True)
        Image.fromarray(texture(96, 112, seed)).save(root / sub / "x.png")
    results = fast_model.test(str(root), str(tmp_path / "out"))
    paths = sorted(r["mask_path"] for r in results)
    assert len(set(paths)) == 2
    assert (tmp_path / "out" / "a" / "x_mask.png").is_file()
    assert (tmp_path / "out" / "b" / "x_mask.png").is_file()
    a = np.asarray(Image.open(tmp_path / "out" / "a" / "x_overlay.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "b" / "x_overlay.png"))
    assert not np.array_equal(a, b)  # each output is its own image's


def test_clashing_names_are_refused_before_writing(fast_model, tmp_path, monkeypatch):
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(texture(96, 112, 1)).save(root / "x.png")
    Image.fromarray(texture(96, 112, 2)).save(root / "x.tif")
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="x_mask.png"):
        fast_model.test(str(root), str(out))
    assert not out.exists()


def test_unwritable_output_fails_before_scoring(fast_model, small_folder, tmp_path, monkeypatch):
    from anomaly_dask import compute

    def boom(*args, **kwargs):
        raise AssertionError("scoring started")

    monkeypatch.setattr(compute.tasks, "score_array", boom)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="a-file"):
        fast_model.test(str(small_folder / "test"), str(blocker / "out"))


# ------------------------------------------------------------------------ bit depth
@pytest.fixture(scope="module")
def gray_case(tmp_path_factory):
    """An 8-bit gray model and an 8-bit test image with a bright square."""
    rng = np.random.default_rng(5)
    imgs = [texture(128, 128, s, channels=1)[:, :, 0] for s in (31, 32, 33)]
    test = texture(128, 128, 34, channels=1)[:, :, 0].copy()
    test[50:80, 40:70] = 250
    noise = rng.integers(0, 3, test.shape).astype(np.uint8)
    test = np.clip(test.astype(int) + noise, 0, 255).astype(np.uint8)
    det = AnomalyDetector(**FAST).train([imgs[0], imgs[1]], [imgs[2]])
    return det, test


def _mask(det: AnomalyDetector, image: np.ndarray) -> np.ndarray:
    return det.score_image(image) >= det.threshold_


def test_16bit_and_float_copies_of_8bit_data_mark_alike(gray_case):
    det, test = gray_case
    assert det.input_dtype_ == "uint8"
    reference = _mask(det, test)
    assert reference.any()
    copies = {
        "uint16 x257": test.astype(np.uint16) * 257,
        "uint16 same values": test.astype(np.uint16),
        "float [0, 1]": test.astype(np.float32) / 255.0,
        "float [0, 255]": test.astype(np.float32),
    }
    for label, copy in copies.items():
        with pytest.warns(UserWarning, match="trained on uint8"):
            mask = _mask(det, copy)
        changed = float((mask != reference).mean())
        assert changed <= 0.01, f"{label}: {changed:.3%} of pixels differ"


def test_values_outside_any_reading_are_refused(gray_case):
    det, test = gray_case
    with pytest.raises(ImageReadError, match="convert the image"):
        det.score_image(test.astype(np.float32) * 16.0)


def test_mixed_bit_depths_in_training_are_refused():
    a = texture(96, 96, 1, channels=1)[:, :, 0]
    with pytest.raises(ImageReadError, match="one bit depth"):
        AnomalyDetector(**FAST).train([a, a.astype(np.uint16) * 257], [a])


# ------------------------------------------------------------------------ storage options
def test_nested_storage_options_with_a_pillow_image(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(texture(40, 48, 3)).save(path)
    options = {"client_kwargs": {"headers": {"x-a": "1"}}, "list": [1, {"b": 2}]}
    assert thaw_options(freeze_options(options)) == options
    src = open_source(str(path), options)
    assert src.read(0, 40, 0, 48).shape == (40, 48, 3)


# ------------------------------------------------------------------------ CLI: one line each
def test_cli_train_to_unwritable_model_fails_before_training(small_folder, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(AnomalyDetector, "train", boom)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _run_main(["train", str(small_folder / "train"), "--model", str(blocker / "m.safetensors")], capsys)
    assert code == 1 and "cannot write" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, needle", [
    (["--device", "bogus"], "--device bogus"),
    (["--cdf", "nan"], "cdf"),
    (["--pca-variance", "nan"], "--pca-variance nan"),  # the CLI names its options, not keywords
    (["--val-fraction", "nan"], "--val-fraction nan"),
    (["--threshold-mode", "zscore", "--zscore", "nan"], "zscore"),
])
def test_cli_bad_parameters_one_line(small_folder, tmp_path, capsys, extra, needle):
    argv = ["train", str(small_folder / "train"), "--model", str(tmp_path / "m.safetensors"), *extra]
    code, err = _run_main(argv, capsys)
    assert code != 0 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_internal_error_is_one_line(small_folder, tmp_path, capsys, monkeypatch, scheduler_args):
    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(AnomalyDetector, "train", broken)
    argv = ["train", str(small_folder / "train"), "--model", str(tmp_path / "m.safetensors"), *scheduler_args]
    code, err = _run_main(argv, capsys)
    assert code == 2 and "internal error (IndexError" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_path_helpers_keep_relative_folders(tmp_path):
    from anomaly_dask.io import output_names

    root = Path("/data/in")
    files = [str(root / "a" / "x.png"), str(root / "b" / "deep" / "x.tif"), str(root / "y.jpeg")]
    assert output_names(str(root), files) == ["a/x", "b/deep/x", "y"]


def test_cli_nested_storage_options_with_a_png_input(fast_model, small_folder, tmp_path, capsys, scheduler_args):
    model = tmp_path / "m.safetensors"
    fast_model.save(str(model))
    out = tmp_path / "o.zarr"
    argv = ["detect", str(model), str(small_folder / "test" / "test0.png"), "--output", str(out),
            "--storage-option", "client_kwargs.headers.x-a=1", *scheduler_args, "-q"]
    code, err = _run_main(argv, capsys)
    assert code == 0, err
    import zarr

    assert zarr.open_group(str(out), mode="r").attrs["complete"] is True


def test_cli_bit_depth_mismatch_is_one_line(gray_case, tmp_path, capsys, scheduler_args):
    import tifffile

    det, test = gray_case
    model = tmp_path / "m.safetensors"
    det.save(str(model))
    tifffile.imwrite(tmp_path / "far.tif", test.astype(np.float32) * 16.0)
    tifffile.imwrite(tmp_path / "x257.tif", test.astype(np.uint16) * 257)
    out = tmp_path / "out"
    code, err = _run_main(["detect", str(model), str(tmp_path / "far.tif"), "--output", str(out),
                           *scheduler_args, "-q"], capsys)
    assert code == 1 and "convert the image" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (out / "far.zarr").exists()
    code, err = _run_main(["detect", str(model), str(tmp_path / "x257.tif"), "--output", str(out),
                           *scheduler_args, "-q"], capsys)
    assert code == 0, err
