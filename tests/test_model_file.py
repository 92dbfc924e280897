"""The model file: exact round trip, and refusal of pickles, tampering, truncation, versions."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from anomaly_dask import AnomalyDetector, ModelFileError

from .conftest import texture


def test_round_trip_gives_identical_scores(fast_model, small_folder, tmp_path):
    path = tmp_path / "m.safetensors"
    fp = fast_model.save(str(path))
    loaded = AnomalyDetector.load(str(path))
    assert loaded.fingerprint_ == fp
    assert loaded.threshold_ == fast_model.threshold_
    assert loaded.get_params()["kmeans_clusters"] == fast_model.kmeans_clusters
    img = texture(80, 90, 5)
    np.testing.assert_array_equal(loaded.score_image(img), fast_model.score_image(img))


def test_save_through_fsspec_memory_url(fast_model):
    fast_model.save("memory://models/m.safetensors")
    loaded = AnomalyDetector.load("memory://models/m.safetensors")
    img = texture(64, 64, 6)
    np.testing.assert_array_equal(loaded.score_image(img), fast_model.score_image(img))


def test_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pickle"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelFileError, match="pickle"):
        AnomalyDetector.load(str(path))
    assert not marker.exists()


def _saved(fast_model, tmp_path):
    path = tmp_path / "m.safetensors"
    fast_model.save(str(path))
    return path, bytearray(path.read_bytes())


def test_tampered_tensor_bytes_are_refused(fast_model, tmp_path):
    path, data = _saved(fast_model, tmp_path)
    data[-5] ^= 0x01  # flip one bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="modified or corrupted"):
        AnomalyDetector.load(str(path))


def _rewrite_metadata(path, data, edit):
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8 : 8 + n]))
    edit(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[8 + n :]))


def test_tampered_threshold_is_refused(fast_model, tmp_path):
    path, data = _saved(fast_model, tmp_path)

    def edit(meta):
        config = json.loads(meta["config"])
        config["threshold"] = config["threshold"] * 10
        meta["config"] = json.dumps(config, sort_keys=True)

    _rewrite_metadata(path, data, edit)
    with pytest.raises(ModelFileError, match="fingerprint"):
        AnomalyDetector.load(str(path))


def test_truncated_file_is_refused(fast_model, tmp_path):
    path, data = _saved(fast_model, tmp_path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelFileError, match="truncated|corrupt"):
        AnomalyDetector.load(str(path))


def test_newer_format_version_is_refused(fast_model, tmp_path):
    path, data = _saved(fast_model, tmp_path)
    _rewrite_metadata(path, data, lambda meta: meta.update(format_version="99"))
    with pytest.raises(ModelFileError, match="version 99"):
        AnomalyDetector.load(str(path))


def test_foreign_files_are_refused(tmp_path):
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(ModelFileError, match="not an anomaly_dask model"):
        AnomalyDetector.load(str(other))
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ModelFileError):
        AnomalyDetector.load(str(png))
    with pytest.raises(ModelFileError, match="does not exist"):
        AnomalyDetector.load(str(tmp_path / "missing.safetensors"))


def test_header_length_starting_with_pickle_magic_still_loads(tmp_path):
    """A header length whose first byte is 0x80 (pickle's magic) is still our file."""
    from anomaly_dask.model_file import read_model, write_model

    path = tmp_path / "m.safetensors"
    for pad in range(1000):
        write_model(str(path), {"pad": "x" * pad}, {"a": np.zeros(2, np.float32)})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length with a low byte of 0x80 was produced")
    config, tensors, _ = read_model(str(path))
    assert config["pad"] == "x" * pad and tensors["a"].shape == (2,)


def test_older_format_version_is_refused_with_a_retrain_message(fast_model, tmp_path):
    path, data = _saved(fast_model, tmp_path)
    _rewrite_metadata(path, data, lambda meta: meta.update(format_version="1"))
    with pytest.raises(ModelFileError, match=r"version 1 \(uncalibrated.*retrain"):
        AnomalyDetector.load(str(path))
