"""The model file: exact round trip, and refusal of pickles, tampering, truncation, versions."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from anomaly_dask import AnomalyDetector, ModelFileError, ParameterError, model_file
from anomaly_dask.model_file import fingerprint, read_model, write_model

from .conftest import texture


def test_round_trip_gives_identical_scores(fast_model, small_folder, tmp_path):
    path = tmp_path / "m.safetensors"
    fp = fast_model.save(str(path))
    # the runtime is not part of the file: load with the one the scores are compared to
    loaded = AnomalyDetector.load(str(path), runtime=fast_model.runtime)
    assert loaded.fingerprint_ == fp
    assert loaded.threshold_ == fast_model.threshold_
    assert loaded.get_params()["kmeans_clusters"] == fast_model.kmeans_clusters
    img = texture(80, 90, 5)
    np.testing.assert_array_equal(loaded.score_image(img), fast_model.score_image(img))


def test_save_through_fsspec_memory_url(fast_model):
    fast_model.save("memory://models/m.safetensors")
    loaded = AnomalyDetector.load("memory://models/m.safetensors", runtime=fast_model.runtime)
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


# ------------------------------------------------------------------ crafted files
# An attacker who edits a model recomputes its (unkeyed) fingerprint: write_model does so.
# Every crafted file below therefore passes the fingerprint check and must be refused by
# the checks of its content, with one ModelFileError naming the field.



@pytest.fixture(scope="module")
def parts(fast_model):
    """The trained model's config (as JSON text) and tensors (copies)."""
    config = json.dumps(fast_model._config())
    tensors = {k: np.array(v, copy=True) for k, v in fast_model._tensors().items()}
    return config, tensors


def _copy(parts):
    config, tensors = parts
    return json.loads(config), {k: v.copy() for k, v in tensors.items()}


def _float_backbone_key(tensors):
    return next(k for k, v in sorted(tensors.items()) if k.startswith("backbone.") and v.dtype == np.float32)


def test_craft_helper_gives_a_loadable_model(parts, tmp_path):
    config, tensors = _copy(parts)
    path = tmp_path / "same.safetensors"
    write_model(str(path), config, tensors)
    loaded = AnomalyDetector.load(str(path))
    assert loaded.threshold_ == config["threshold"]


def _set_param(name, value):
    def edit(config, tensors):
        config["params"][name] = value

    return edit


def _set(path, value):
    def edit(config, tensors):
        node = config
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return edit


def _tensor(name, change):
    def edit(config, tensors):
        key = _float_backbone_key(tensors) if name == "backbone" else name
        tensors[key] = change(tensors[key])

    return edit


def _drop(name):
    def edit(config, tensors):
        del tensors[name]

    return edit


def _with_nan(a):
    a = a.copy()
    a.flat[0] = np.nan
    return a


def _with_inf(a):
    a = a.copy()
    a.flat[-1] = np.inf
    return a


def _pca_dim_minus_one(config, tensors):
    tensors["dictionary.pca_mean"] = tensors["dictionary.pca_mean"][:-1].copy()
    tensors["dictionary.pca_components"] = tensors["dictionary.pca_components"][:, :-1].copy()


CRAFTED = {
    # the file must not steer IO or the run
    "storage_options": (
        _set_param("storage_options", {"client_kwargs": {"headers": {"X-Injected": "1"}}}),
        r"config\.params: holds run setting\(s\) \['storage_options'\]",
    ),
    "client": (_set_param("client", "tcp://attacker:8786"), r"run setting\(s\) \['client'\]"),
    "device": (_set_param("device", "cuda:7"), r"run setting\(s\) \['device'\]"),
    "verbose": (_set_param("verbose", 2), r"run setting\(s\) \['verbose'\]"),
    "overlay_color": (_set_param("overlay_color", [1, 2, 3]), r"run setting\(s\) \['overlay_color'\]"),
    "unknown_param": (_set_param("evil", 1), r"config\.params: unknown parameter\(s\) \['evil'\]"),
    "bad_param": (_set_param("tile", -4), r"config\.params: tile=-4"),
    "nan_param": (_set_param("pca_variance", float("nan")), r"config\.params: pca_variance"),
    "auto_threshold_text": (_set_param("auto_threshold", "no"), r"config\.params: auto_threshold"),
    "params_not_a_dict": (_set(["params"], [1, 2]), r"config\.params: must be a JSON object"),
    # the decision rule
    "threshold_nan": (_set(["threshold"], float("nan")), r"config\.threshold: nan"),
    "threshold_huge": (_set(["threshold"], 1e9), r"config\.threshold: 1000000000\.0 is out of range"),
    "threshold_negative": (_set(["threshold"], -1e9), r"config\.threshold"),
    "threshold_text": (_set(["threshold"], "3"), r"config\.threshold"),
    "threshold_not_rate": (_set(["threshold"], 5.0), r"config\.threshold: 5\.0 is not -log10"),
    "rate_zero": (_set(["false_alarm_rate"], 0.0), r"config\.false_alarm_rate"),
    "rate_above_one": (_set(["false_alarm_rate"], 1.5), r"config\.false_alarm_rate"),
    # intensity map, backbone, seed, versions
    "intensity_inverted": (_set(["intensity", "high"], -1.0), r"config\.intensity\.high"),
    "intensity_nan": (_set(["intensity", "low"], float("nan")), r"config\.intensity\.low"),
    "intensity_fill": (_set(["intensity", "fill"], 2.0), r"config\.intensity\.fill"),
    "intensity_gray": (_set(["intensity", "gray"], "yes"), r"config\.intensity\.gray"),
    "intensity_extra": (_set(["intensity", "gamma"], 2.0), r"config\.intensity: .*unknown field\(s\) \['gamma'\]"),
    "backbone_name": (_set(["backbone", "name"], "vgg_evil"), r"config\.backbone\.name"),
    "backbone_layers_text": (_set(["backbone", "layers"], "blocks2"), r"config\.backbone\.layers"),
    "backbone_layers_unknown": (_set(["backbone", "layers"], ["nope"]), r"config\.backbone\.layers"),
    "weights_id": (_set(["backbone", "weights_id"], 5), r"config\.backbone\.weights_id"),
    "random_state": (_set(["random_state"], "zero"), r"config\.random_state"),
    "random_state_negative": (_set(["random_state"], -1), r"config\.random_state"),
    "versions": (_set(["versions"], {"torch": ["x"]}), r"config\.versions\.torch"),
    "config_extra_field": (_set(["hook"], "x"), r"config: .*unknown field\(s\) \['hook'\]"),
    "config_missing_field": (
        lambda c, t: c.pop("intensity"), r"config: missing field\(s\) \['intensity'\]"
    ),
    # dictionary tensors
    "nan_centroids": (_tensor("dictionary.centroids", _with_nan), r"dictionary\.centroids: holds NaN"),
    "inf_memory": (_tensor("dictionary.memory", _with_inf), r"dictionary\.memory: holds NaN or infinite"),
    "int64_centroids": (
        _tensor("dictionary.centroids", lambda a: a.astype(np.int64)),
        r"dictionary\.centroids: dtype int64 where float32",
    ),
    "float64_pca": (
        _tensor("dictionary.pca_components", lambda a: a.astype(np.float64)),
        r"dictionary\.pca_components: dtype float64",
    ),
    "pca_wrong_shape": (
        _tensor("dictionary.pca_components", lambda a: a[:, :-1].copy()),
        r"dictionary\.pca_components: shape",
    ),
    "pca_wrong_dim": (_pca_dim_minus_one, r"dictionary\.pca_mean: shape .*backbone gives features of dimension"),
    "centroids_wrong_shape": (
        _tensor("dictionary.centroids", lambda a: np.hstack([a, a[:, :1]])),
        r"dictionary\.centroids: shape",
    ),
    "memory_wrong_shape": (
        _tensor("dictionary.memory", lambda a: a[:, :-1].copy()), r"dictionary\.memory: shape"
    ),
    "memory_over_memory_size": (
        _set_param("memory_size", 10), r"dictionary\.memory: \d+ rows, but config\.params\.memory_size=10"
    ),
    "memory_without_memory_size": (_set_param("memory_size", 0), r"dictionary\.memory: .*memory_size=0"),
    "centroids_over_kmeans_clusters": (
        _set_param("kmeans_clusters", 4), r"dictionary\.centroids: 8 centroids, more than .*kmeans_clusters=4"
    ),
    "zero_scaler": (_tensor("dictionary.scaler_scale", np.zeros_like), r"dictionary\.scaler_scale"),
    "negative_scaler": (_tensor("dictionary.scaler_scale", lambda a: -a), r"dictionary\.scaler_scale"),
    "missing_centroids": (_drop("dictionary.centroids"), r"dictionary\.\*: tensors missing \['dictionary\.centroids'\]"),
    "extra_tensor": (lambda c, t: t.update(extra=np.zeros(2, np.float32)), r"tensors: unknown tensor"),
    # calibration tensors
    "calibration_missing": (
        _drop("dictionary.calibration.knots"), r"dictionary\.calibration\.\*: calibration tensors missing"
    ),
    "calibration_parents_cycle": (
        _tensor("dictionary.calibration.parents", np.zeros_like), r"dictionary\.calibration\.parents"
    ),
    "calibration_knots_decreasing": (
        _tensor("dictionary.calibration.knots", lambda a: a[:, ::-1].copy()), r"dictionary\.calibration\.knots"
    ),
    "calibration_knots_nan": (
        _tensor("dictionary.calibration.knots", _with_nan), r"dictionary\.calibration\.knots: holds NaN"
    ),
    "calibration_table_range": (
        _tensor("dictionary.calibration.table", lambda a: a + 5), r"dictionary\.calibration\.table: groups"
    ),
    "calibration_table_shape": (
        _tensor("dictionary.calibration.table", lambda a: a[:, :-1].copy()), r"dictionary\.calibration\.table: shape"
    ),
    "calibration_table_int64": (
        _tensor("dictionary.calibration.table", lambda a: a.astype(np.int64)), r"dictionary\.calibration\.table: dtype"
    ),
    "calibration_tail_scale": (
        _tensor("dictionary.calibration.tail_scale", np.zeros_like), r"dictionary\.calibration\.tail_scale"
    ),
    "calibration_edges": (
        _tensor("dictionary.calibration.distance_edges", lambda a: a[::-1].copy()),
        r"dictionary\.calibration\.distance_edges",
    ),
    # backbone tensors
    "inf_backbone": (_tensor("backbone", _with_inf), r"backbone\.\S+: holds NaN or infinite"),
    "nan_backbone": (_tensor("backbone", _with_nan), r"backbone\.\S+: holds NaN"),
    "int8_backbone": (_tensor("backbone", lambda a: a.astype(np.int8)), r"backbone\.\S+: dtype int8 where float32"),
    "backbone_wrong_shape": (_tensor("backbone", lambda a: a.ravel()[:1].copy()), r"backbone\.\S+: shape"),
    "backbone_missing": (
        lambda c, t: t.pop(_float_backbone_key(t)), r"backbone\.\*: tensors do not fit .*1 missing"
    ),
    "backbone_extra": (
        lambda c, t: t.update({"backbone.stages.blocks6.0.weight": np.zeros(3, np.float32)}),
        r"backbone\.\*: tensors do not fit .*1 unknown",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_model_is_refused_naming_the_field(case, parts, tmp_path):
    edit, message = CRAFTED[case]
    config, tensors = _copy(parts)
    edit(config, tensors)
    path = tmp_path / f"{case}.safetensors"
    write_model(str(path), config, tensors)
    read_model(str(path))  # the fingerprint matches: only the content checks can refuse it
    with pytest.raises(ModelFileError, match=message) as info:
        AnomalyDetector.load(str(path))
    assert str(path) in str(info.value)


def test_centroid_and_memory_caps(parts, monkeypatch):
    from anomaly_dask import config as params
    from anomaly_dask.dictionary import Dictionary

    _, tensors = _copy(parts)
    d = {k[len("dictionary."):]: v for k, v in tensors.items() if k.startswith("dictionary.")}
    Dictionary.check_arrays(d)
    k, m = len(d["centroids"]), len(d["memory"])
    monkeypatch.setattr(params, "MAX_MEMORY", m - 1)
    with pytest.raises(ModelFileError, match=rf"dictionary\.memory: {m} rows; 1 to {m - 1}"):
        Dictionary.check_arrays(d)
    monkeypatch.setattr(params, "MAX_CENTROIDS", k - 1)
    with pytest.raises(ModelFileError, match=rf"dictionary\.centroids: {k} centroids; 1 to {k - 1}"):
        Dictionary.check_arrays(d)


def _write_raw(path, config_text, tensors):
    """A model file whose config is exactly ``config_text`` (fingerprint recomputed)."""
    from safetensors.numpy import save as st_save

    meta = {
        "format": model_file.FORMAT,
        "format_version": str(model_file.FORMAT_VERSION),
        "config": config_text,
        "fingerprint": fingerprint(config_text, tensors),
    }
    path.write_bytes(st_save(tensors, metadata=meta))


@pytest.mark.parametrize("text", [
    "[" * 200_000 + "]" * 200_000,  # deeply nested JSON
    '{"params": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"params": {"tile": 1' + "0" * 5000 + "}}",  # more digits than Python parses
    "not json",
], ids=["nested", "nested_params", "long_int", "garbage"])
def test_malformed_config_text_is_refused(text, parts, tmp_path):
    _, tensors = _copy(parts)
    path = tmp_path / "m.safetensors"
    _write_raw(path, text, tensors)
    with pytest.raises(ModelFileError, match="unreadable config"):
        AnomalyDetector.load(str(path))


def test_config_not_an_object_is_refused(parts, tmp_path):
    _, tensors = _copy(parts)
    path = tmp_path / "m.safetensors"
    _write_raw(path, "[1, 2, 3]", tensors)
    with pytest.raises(ModelFileError, match="config: must be a JSON object"):
        AnomalyDetector.load(str(path))


def test_loading_takes_run_settings_from_the_caller_only(fast_model, tmp_path):
    path = tmp_path / "m.safetensors"
    fast_model.save(str(path))
    stored = read_model(str(path))[0]["params"]
    from anomaly_dask.config import RUNTIME

    assert not set(stored) & set(RUNTIME)
    loaded = AnomalyDetector.load(str(path), chunk_size=512, device="cpu", verbose=0, false_alarm_rate=0.01)
    assert loaded.storage_options is None and loaded.client is None
    assert loaded.chunk_size == 512 and loaded.device == "cpu"
    assert loaded.threshold_ == pytest.approx(2.0)


def test_oversized_file_is_refused_before_reading(fast_model, tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    path = tmp_path / "m.safetensors"
    fast_model.save(str(path))
    size = path.stat().st_size
    monkeypatch.setattr(model_file, "MAX_MODEL_BYTES", size - 1)

    def no_reading(*args, **kwargs):
        raise AssertionError("the body of an oversized model file was opened")

    monkeypatch.setattr(LocalFileSystem, "_open", no_reading)
    with pytest.raises(ModelFileError, match=rf"{size} bytes is larger than the {size - 1} bytes"):
        AnomalyDetector.load(str(path))


def test_file_of_unknown_size_is_read_only_up_to_the_cap(fast_model, tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    path = tmp_path / "m.safetensors"
    fast_model.save(str(path))
    monkeypatch.setattr(LocalFileSystem, "size", lambda self, p: None)  # as some HTTP servers
    AnomalyDetector.load(str(path))
    monkeypatch.setattr(model_file, "MAX_MODEL_BYTES", 1000)
    with pytest.raises(ModelFileError, match="more than 1000 bytes"):
        AnomalyDetector.load(str(path))


def test_a_model_over_the_cap_is_not_written(fast_model, tmp_path, monkeypatch):
    monkeypatch.setattr(model_file, "MAX_MODEL_BYTES", 1000)
    path = tmp_path / "m.safetensors"
    with pytest.raises(ModelFileError, match="MAX_MODEL_BYTES"):
        fast_model.save(str(path))
    assert not path.exists()


def test_default_model_is_far_below_the_cap(fast_model, tmp_path):
    path = tmp_path / "m.safetensors"
    fast_model.save(str(path))
    assert path.stat().st_size < model_file.MAX_MODEL_BYTES / 20


# ------------------------------------------------------------------ signatures
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs, "a" and "b": (private path, public path, key id)."""
    from anomaly_dask.signing import write_keypair

    root = tmp_path_factory.mktemp("keys")
    return {name: write_keypair(root / name) for name in ("a", "b")}


@pytest.fixture(scope="module")
def signed(fast_model, keys, tmp_path_factory):
    """The fast model saved signed with key "a"; returns its path."""
    path = tmp_path_factory.mktemp("signed") / "m.safetensors"
    fast_model.save(str(path), signing_key=keys["a"][0])
    return path


def _meta(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"]


def test_keypair_files(keys):
    import os
    import stat

    private, public, kid = keys["a"]
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert open(private).read().startswith("-----BEGIN PRIVATE KEY-----")
    assert open(public).read().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(kid) == 16 and kid != keys["b"][2]


def test_signed_model_loads_with_the_trusted_key(signed, keys):
    from anomaly_dask.signing import load_public_key

    meta = _meta(signed)
    assert meta["signer"] == keys["a"][2] and len(bytes.fromhex(meta["signature"])) == 64
    by_path = AnomalyDetector.load(str(signed), trusted_keys=[keys["a"][1]])
    by_object = AnomalyDetector.load(str(signed), trusted_keys=[load_public_key(keys["a"][1])])
    both = AnomalyDetector.load(str(signed), trusted_keys=[keys["b"][1], keys["a"][1]])
    unchecked = AnomalyDetector.load(str(signed))  # a signature is optional without trusted keys
    assert by_path.fingerprint_ == by_object.fingerprint_ == both.fingerprint_ == unchecked.fingerprint_
    assert by_path.fingerprint_ == meta["fingerprint"]


def test_signature_is_not_part_of_the_fingerprint(fast_model, signed, tmp_path):
    plain = tmp_path / "plain.safetensors"
    fast_model.save(str(plain))
    assert _meta(plain)["fingerprint"] == _meta(signed)["fingerprint"]
    assert "signature" not in _meta(plain)


def test_unsigned_model_is_refused_with_trusted_keys(fast_model, keys, tmp_path):
    path = tmp_path / "m.safetensors"
    fast_model.save(str(path))
    with pytest.raises(ModelFileError, match="not signed"):
        AnomalyDetector.load(str(path), trusted_keys=[keys["a"][1]])


def test_model_signed_by_another_key_is_refused(signed, keys):
    with pytest.raises(ModelFileError, match=rf"signed by key {keys['a'][2]}, which is not among"):
        AnomalyDetector.load(str(signed), trusted_keys=[keys["b"][1]])


def test_edited_signed_model_is_refused_with_trusted_keys(signed, keys, tmp_path):
    config, tensors, _ = read_model(str(signed))
    config["threshold"], config["false_alarm_rate"] = 9.0, 1e-9
    # the attacker re-writes it with the public writer (fingerprint recomputed, unsigned) ...
    rewritten = tmp_path / "rewritten.safetensors"
    write_model(str(rewritten), config, tensors)
    AnomalyDetector.load(str(rewritten))  # a well-formed model: only the signature can tell
    with pytest.raises(ModelFileError, match="not signed"):
        AnomalyDetector.load(str(rewritten), trusted_keys=[keys["a"][1]])
    # ... or keeps the old signature next to the new fingerprint ...
    kept = tmp_path / "kept.safetensors"
    data = bytearray(rewritten.read_bytes())
    old = _meta(signed)
    _rewrite_metadata(kept, data, lambda meta: meta.update(signature=old["signature"], signer=old["signer"]))
    with pytest.raises(ModelFileError, match="does not verify"):
        AnomalyDetector.load(str(kept), trusted_keys=[keys["a"][1]])
    # ... or signs it with its own key and claims to be "a"
    forged = tmp_path / "forged.safetensors"
    write_model(str(forged), config, tensors, signing_key=keys["b"][0])
    _rewrite_metadata(forged, bytearray(forged.read_bytes()), lambda meta: meta.update(signer=keys["a"][2]))
    with pytest.raises(ModelFileError, match="does not verify"):
        AnomalyDetector.load(str(forged), trusted_keys=[keys["a"][1]])


def test_edited_signed_model_without_new_fingerprint_is_refused_without_keys(signed, tmp_path):
    path = tmp_path / "m.safetensors"

    def edit(meta):
        config = json.loads(meta["config"])
        config["threshold"] = 9.0
        meta["config"] = json.dumps(config, sort_keys=True)

    _rewrite_metadata(path, bytearray(signed.read_bytes()), edit)
    with pytest.raises(ModelFileError, match="fingerprint"):
        AnomalyDetector.load(str(path))


def test_malformed_signature_is_refused(signed, tmp_path):
    path = tmp_path / "m.safetensors"
    _rewrite_metadata(path, bytearray(signed.read_bytes()), lambda meta: meta.update(signature="zz"))
    with pytest.raises(ModelFileError, match="signature is malformed"):
        AnomalyDetector.load(str(path))
    _rewrite_metadata(path, bytearray(signed.read_bytes()), lambda meta: meta.pop("signer"))
    with pytest.raises(ModelFileError, match="incomplete signature"):
        AnomalyDetector.load(str(path))


def test_bad_key_arguments(signed, keys, fast_model, tmp_path):
    with pytest.raises(ParameterError, match="empty"):
        AnomalyDetector.load(str(signed), trusted_keys=[])
    with pytest.raises(ParameterError, match="not a PEM public key"):
        AnomalyDetector.load(str(signed), trusted_keys=[keys["a"][0]])  # the private key file
    with pytest.raises(ParameterError, match="does not exist"):
        AnomalyDetector.load(str(signed), trusted_keys=[str(tmp_path / "none.pub.pem")])
    with pytest.raises(ParameterError, match="not a PEM private key"):
        fast_model.save(str(tmp_path / "m.safetensors"), signing_key=keys["a"][1])
    assert not (tmp_path / "m.safetensors").exists()


def test_keygen_cli_and_signed_round_trip(fast_model, tmp_path, capsys):
    import os
    import stat

    from anomaly_dask import cli

    prefix = tmp_path / "team"
    assert cli.main(["keygen", str(prefix)]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "team.pem", tmp_path / "team.pub.pem"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600 and public.is_file()
    assert str(private) in out
    assert cli.main(["keygen", str(prefix)]) == 1  # never overwrites a key
    assert "exists already" in capsys.readouterr().err
    path = tmp_path / "m.safetensors"
    fast_model.save(str(path), signing_key=str(private))
    assert AnomalyDetector.load(str(path), trusted_keys=[str(public)]).fingerprint_


def test_cli_signing_options(tmp_path, capsys):
    from anomaly_dask import cli

    parser = cli.build_parser()
    args = parser.parse_args(["detect", "m", "in.tif", "--output", "o", "--trusted-key", "a.pub.pem",
                              "--trusted-key", "b.pub.pem"])
    assert args.trusted_keys == ["a.pub.pem", "b.pub.pem"]
    args = parser.parse_args(["evaluate", "m", "t", "--ground-truth", "g", "--output", "o"])
    assert args.trusted_keys is None
    args = parser.parse_args(["train", "x", "--model", "m", "--signing-key", "k.pem"])
    assert args.signing_key == "k.pem"
    # a missing signing key is reported before anything is trained
    code = cli.main(["train", "x", "--model", str(tmp_path / "m.safetensors"),
                     "--signing-key", str(tmp_path / "none.pem")])
    err = capsys.readouterr().err
    assert code == 1 and "signing key" in err and "does not exist" in err


@pytest.mark.parametrize("case", sorted(CRAFTED) + ["nested_config", "pickle", "truncated"])
def test_cli_refuses_every_crafted_model_in_one_line(case, parts, small_folder, tmp_path, capsys):
    """The CLI on each hostile file: exit 1, one line naming the file, no traceback, no output."""
    from anomaly_dask import cli

    config, tensors = _copy(parts)
    path = tmp_path / f"{case}.safetensors"
    if case in CRAFTED:
        CRAFTED[case][0](config, tensors)
        write_model(str(path), config, tensors)
    elif case == "nested_config":
        _write_raw(path, "[" * 200_000 + "]" * 200_000, tensors)
    elif case == "pickle":
        path.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    else:
        write_model(str(path), config, tensors)
        path.write_bytes(path.read_bytes()[:-100])
    out = tmp_path / "out"
    image = str(small_folder / "test" / "test0.png")
    for argv in (["detect", str(path), image, "--output", str(out)],
                 ["evaluate", str(path), image, "--ground-truth", image, "--output", str(out)]):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
        err = capsys.readouterr().err
        assert code == 1, (argv[0], err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(path) in err
        assert not out.exists()
