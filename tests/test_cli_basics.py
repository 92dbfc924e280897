"""The command line's basics: a light --help, --version, detect inputs, --json, option wording."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile
import zarr

from anomaly_dask import __version__, cli
from anomaly_dask.cli_support import cli_terms, find_inputs, stores_for

from .conftest import REPO, texture
from .test_cli import _run_main

HEAVY = {"torch", "dask", "distributed", "zarr", "rasterio", "sklearn", "timm"}




def test_building_the_parser_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from anomaly_dask.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.format_help()\n"
        "for name in ('train', 'detect', 'evaluate'):\n"
        "    try:\n"
        "        parser.parse_args([name, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_help_and_version():
    proc = subprocess.run([sys.executable, "-m", "anomaly_dask", "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "examples:" in proc.stdout and "anomaly-dask detect" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "anomaly_dask", "--version"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"anomaly-dask {__version__}"


def test_detect_help_documents_the_scheduler_variable(capsys):
    code, out, _ = _run_main(["detect", "--help"], capsys)
    assert code == 0 and "DASK_SCHEDULER_ADDRESS" in out and "'data/**/*.tif'" in out


def test_lazy_package_keeps_its_names():
    import anomaly_dask
    from anomaly_dask import AnomalyDetector, ParameterError
    from anomaly_dask.errors import ParameterError as Original

    assert ParameterError is Original and AnomalyDetector.__name__ == "AnomalyDetector"
    assert all(hasattr(anomaly_dask, name) for name in anomaly_dask.__all__)
    with pytest.raises(AttributeError):
        anomaly_dask.no_such_name  # noqa: B018


def test_backbone_names_agree_with_the_registry():
    from anomaly_dask.backbones import BACKBONES
    from anomaly_dask.config import BACKBONE_NAMES

    assert sorted(BACKBONE_NAMES) == sorted(BACKBONES)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """data/{a/x.tif, b/x.tif, y.tif, notes.txt, scan/ (zarr without suffix), z.zarr}."""
    data = tmp_path / "data"
    for sub in ("a", "b"):
        (data / sub).mkdir(parents=True)
        tifffile.imwrite(data / sub / "x.tif", texture(96, 112, 0))
    tifffile.imwrite(data / "y.tif", texture(96, 112, 1))
    (data / "notes.txt").write_text("not an image")
    zarr.create_array(data / "scan", shape=(96, 112, 3), dtype="u1")
    zarr.create_array(data / "z.zarr", shape=(96, 112, 3), dtype="u1")
    return data


def test_detect_inputs_folders_patterns_and_zarr(tree: Path):
    with pytest.warns(UserWarning, match="notes.txt"):
        found = find_inputs([str(tree)])
    assert [stem for _, stem in found] == ["scan", "z", "a/x", "b/x", "y"]
    assert stores_for(found, "out/")[:3] == ["out/scan.zarr", "out/z.zarr", "out/a/x.zarr"]
    assert find_inputs([str(tree / "scan")]) == [(str(tree / "scan"), "scan")]  # one image, not a folder
    found = find_inputs([str(tree / "*" / "x.tif"), f"file://{tree}/y.tif"])
    assert [stem for _, stem in found] == ["a/x", "b/x", "y"]
    assert found[-1][0] == f"file://{tree}/y.tif"
    assert [s for _, s in find_inputs([f"file://{tree}/**/*.tif"])] == ["a/x", "b/x", "y"]
    with pytest.raises(cli.CliError, match=r"input '.*\*\.png' matches no file or folder"):
        find_inputs([str(tree / "*.png")])


def test_detect_refuses_clashing_names_before_scoring(tree: Path, fast_model, tmp_path, capsys):
    fast_model.save(str(tmp_path / "m.safetensors"))
    out = tmp_path / "out"
    code, _, err = _run_main(["detect", str(tmp_path / "m.safetensors"), str(tree / "a"), str(tree / "b"),
                              "--output", str(out)], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert "share the name 'x'" in err and f"{out}/x.zarr" in err and not out.exists()
    code, _, err = _run_main(["detect", str(tmp_path / "m.safetensors"), str(tmp_path / "none*.tif"),
                              "--output", str(out)], capsys)
    expected = f"anomaly-dask: error: input '{tmp_path}/none*.tif' matches no file or folder"
    assert code == 1 and err.strip() == expected


def test_detect_json_and_the_scheduler_variable(tree: Path, fast_model, tmp_path, capsys, monkeypatch,
                                                session_client):
    """A folder and a pattern into nested stores, on the scheduler named by the environment;
    --json leaves stdout to one object."""
    fast_model.save(str(tmp_path / "m.safetensors"))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", session_client.scheduler.address)
    out = tmp_path / "out"
    argv = ["detect", str(tmp_path / "m.safetensors"), str(tree / "a"), str(tree / "*.tif"),
            "--output", str(out), "--json", "--no-quicklook"]
    code, stdout, err = _run_main(argv, capsys)
    assert code == 0, err
    summary = json.loads(stdout)  # the whole of stdout is one JSON object
    assert [(Path(i["input"]).name, i["store"]) for i in summary["images"]] == [
        ("x.tif", f"{out}/x.zarr"), ("y.tif", f"{out}/y.zarr")]
    assert summary["pixels"] == 2 * 96 * 112 and 0 <= summary["anomalous_fraction"] <= 1
    assert "DASK_SCHEDULER_ADDRESS" in err and "done: 2 image(s)" in err


def test_scheduler_variable_is_used_without_options(fast_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:9")
    assert cli.scheduler_address(None, None) == "tcp://127.0.0.1:9"
    assert cli.scheduler_address("tcp://h:1", None) == "tcp://h:1"
    assert cli.scheduler_address(None, "file.json") is None


def test_train_and_evaluate_json(small_folder: Path, tmp_path, capsys, scheduler_args):
    model = str(tmp_path / "m.safetensors")
    fast = ["--weights", "none", "--kmeans-clusters", "8", "--kmeans-trials", "2", "--random-state", "0"]
    code, out, err = _run_main(["train", str(small_folder / "train"), "--val", str(small_folder / "val"),
                                "--model", model, *fast, "--json", *scheduler_args], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == model and summary["centroids"] == 8 and len(summary["fingerprint"]) >= 12
    assert "sampling features" in err and "calibrating" in err  # the progress bars, on stderr
    gt = tmp_path / "gt"
    gt.mkdir()
    mask = texture(96, 112, 0)[..., 0] * 0
    mask[40:70, 50:80] = 255
    tifffile.imwrite(gt / "test0.tif", mask)
    code, out, err = _run_main(["evaluate", model, str(small_folder / "test"), "--ground-truth", str(gt),
                                "--output", str(tmp_path / "rep"), "--json", *scheduler_args], capsys)
    assert code == 0, err
    assert 0 <= json.loads(out)["auroc"] <= 1 and "AUROC" in err


def test_quiet_training_shows_no_bars(small_folder: Path, tmp_path, capsys, scheduler_args):
    model = str(tmp_path / "m.safetensors")
    code, out, err = _run_main(["train", str(small_folder / "train"), "--model", model,
                                "--weights", "none", "--kmeans-clusters", "8", "--kmeans-trials", "2", "-q",
                                *scheduler_args], capsys)
    assert code == 0 and out == "" and "sampling" not in err, err


@pytest.mark.parametrize(("message", "wording"), [
    ("u holds run 'a'; pass overwrite=True (--overwrite) to delete it",
     "u holds run 'a'; pass --overwrite to delete it"),
    ("false_alarm_rate=2.0 is out of range", "--false-alarm-rate 2.0 is out of range"),
    ("storage_options=3 must be a dict", "--storage-option 3 must be a dict"),
    ("threshold_mode='manual' (or auto_threshold=False) needs threshold=<calibrated score>",
     "--threshold-mode manual (or --no-auto-threshold) needs --threshold <calibrated score>"),
    ("pass weights=None for random weights", "pass --weights none for random weights"),
    ("config.params.kmeans_clusters=8 stays; -log10(false_alarm_rate=0.1) stays",
     "config.params.kmeans_clusters=8 stays; -log10(false_alarm_rate=0.1) stays"),
])
def test_library_keywords_read_as_options(message, wording):
    assert cli_terms(message) == wording


def test_errors_through_main_name_options(fast_model, small_folder, tmp_path, capsys, scheduler_args):
    code, _, err = _run_main(["train", "x", "--model", str(tmp_path / "m.safetensors"),
                              "--false-alarm-rate", "2"], capsys)
    assert err.startswith("anomaly-dask: error: --false-alarm-rate 2.0 ") and "=" not in err, err
    assert code == 1
    model = str(tmp_path / "m.safetensors")
    fast_model.save(model)
    store = tmp_path / "out" / "test0.zarr"
    zarr.open_group(store, mode="w")  # a zarr hierarchy this package did not write
    argv = ["detect", model, str(small_folder / "test"), "--output", str(tmp_path / "out"), "-q"]
    code, _, err = _run_main([*argv, *scheduler_args], capsys)
    assert code == 1 and "pass --overwrite to delete it" in err and "overwrite=True" not in err, err
    assert cli.main(["keygen", str(tmp_path / "key")]) == 0
    capsys.readouterr()
    argv = ["detect", model, str(small_folder / "test"), "--output", str(tmp_path / "o2"),
            "--trusted-key", str(tmp_path / "key.pub.pem")]
    code, _, err = _run_main(argv, capsys)
    assert code == 1 and "(train --signing-key)" in err and "signing_key=" not in err, err
