"""The ``anomaly-dask`` command line: help, argument errors, storage options, unreachable scheduler."""

from __future__ import annotations

import socket
import time

import pytest
import tifffile

from anomaly_dask import cli
from anomaly_dask.config import DEFAULTS

from .conftest import texture


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_help_mentions_every_option(capsys):
    code, out, _ = _run_main(["--help"], capsys)
    assert code == 0 and "train" in out and "detect" in out
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    for name in ("train", "detect"):
        code, out, _ = _run_main([name, "--help"], capsys)
        assert code == 0
        flags = _flags(subs[name])
        assert flags, name
        for flag in flags:
            assert flag in out, f"{name} --help lacks {flag}"
    train_flags = _flags(subs["train"])
    for key in DEFAULTS:
        if key not in ("client", "storage_options", "verbose"):
            assert "--" + key.replace("_", "-") in train_flags
    for flag in ("--scheduler", "--scheduler-file", "--workers", "--threads-per-worker",
                 "--storage-option", "--performance-report", "--kmeans-clusters", "--weights",
                 "--random-state", "--chunk-size", "--model", "--val"):
        assert flag in train_flags
    for flag in ("--output", "--png-tiles", "--geotiff", "--overwrite", "--no-quicklook", "--chunk-size"):
        assert flag in _flags(subs["detect"])


@pytest.mark.parametrize("argv", [
    [],
    ["bogus"],
    ["train", "x"],  # no --model
    ["train", "x", "--model", "m", "--tile", "abc"],
    ["train", "x", "--model", "m", "--upsample", "3"],
    ["detect", "m.safetensors", "in.tif"],  # no --output
    ["detect", "m", "in.tif", "--output", "o", "--geotiff", "rgb"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    code, out, err = _run_main(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anomaly-dask: error: "), err


def test_storage_options_and_outputs():
    assert cli.parse_storage_options([]) is None
    assert cli.parse_storage_options(
        ["anon=false", "key=abc", "client_kwargs.endpoint_url=http://h:9000", "client_kwargs.verify=0"]
    ) == {"anon": False, "key": "abc", "client_kwargs": {"endpoint_url": "http://h:9000", "verify": 0}}
    with pytest.raises(cli.CliError, match="KEY=VALUE"):
        cli.parse_storage_options(["novalue"])
    assert cli.output_for(["a/x.tif"], "out/one.zarr") == ["out/one.zarr"]
    assert cli.output_for(["a/x.tif", "s3://b/y.zarr"], "s3://o/") == ["s3://o/x.zarr", "s3://o/y.zarr"]
    with pytest.raises(cli.CliError, match="share"):
        cli.output_for(["a/x.tif", "b/x.tif"], "out")


def test_bad_storage_option_is_one_line(capsys):
    code, _, err = _run_main(
        ["detect", "m", "in.tif", "--output", "o", "--storage-option", "oops"], capsys
    )
    assert code == 1 and err.strip() == "anomaly-dask: error: --storage-option 'oops' must look like KEY=VALUE"


def test_unreachable_scheduler_fails_fast_with_one_line(fast_model, tmp_path, capsys):
    fast_model.save(str(tmp_path / "m.safetensors"))  # the model is checked before connecting
    tifffile.imwrite(tmp_path / "in.tif", texture(96, 112, 0))  # and so are the inputs
    port = _closed_port()
    t0 = time.perf_counter()
    code, _, err = _run_main(
        ["detect", str(tmp_path / "m.safetensors"), str(tmp_path / "in.tif"), "--output", str(tmp_path / "out"),
         "--scheduler", f"tcp://127.0.0.1:{port}", "--connect-timeout", "2"], capsys,
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anomaly-dask: error: cannot reach ")
    assert f"127.0.0.1:{port}" in lines[0]
    assert time.perf_counter() - t0 < 30


def test_missing_scheduler_file_is_one_line(tmp_path, capsys):
    code, _, err = _run_main(
        ["train", "x", "--model", "m", "--scheduler-file", str(tmp_path / "nope.json")], capsys
    )
    assert code == 1 and err.count("\n") == 1 and "nope.json does not exist" in err
