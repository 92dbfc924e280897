"""The parameter table and everything made from it: defaults, run settings, validation,
the ``AnomalyDetector`` signature, the command line and the README table."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math

import pytest

from anomaly_dask import AnomalyDetector, ParameterError, cli, config
from anomaly_dask.config import DEFAULTS, MAX_CENTROIDS, MAX_MEMORY, PARAMS, RUNTIME, Param, validate

from .conftest import REPO

DETECTOR_GROUP = "detector options (AnomalyDetector keyword arguments)"


def _readme_job():
    spec = importlib.util.spec_from_file_location("update_readme_params", REPO / "jobs" / "update_readme_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# ------------------------------------------------------------------------ the table
def test_table_gives_defaults_and_run_settings():
    names = [p.name for p in PARAMS]
    assert len(names) == len(set(names))
    assert list(DEFAULTS) == names
    assert all(DEFAULTS[p.name] == p.default for p in PARAMS)
    # run settings are refused in model files: this set is part of the file format
    assert set(RUNTIME) == {
        "client", "storage_options", "device", "verbose", "chunk_size", "cnn_batchsize",
        "overlay_color", "overlay_opacity", "runtime",
    }
    assert [p.name for p in PARAMS if p.seed][-1] == "val_fraction"
    assert all(p.seed for p in PARAMS[: names.index("val_fraction") + 1])


def test_table_references_are_parameters():
    for p in PARAMS:
        for other in (p.fallback, p.alias_of, p.high if isinstance(p.high, str) else None):
            assert other is None or other in DEFAULTS, (p.name, other)
        if p.kind == "choice":
            assert p.default in p.choices or (p.default is None and p.nullable), p.name
        assert set(p.commands) <= {"train", "detect", "evaluate"}, p.name
        assert not p.commands or "train" in p.commands, p.name


def test_a_row_with_an_unknown_kind_or_no_range_is_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        Param("x", 1, "int", "integer", "an x")
    with pytest.raises(ValueError, match="range"):
        Param("x", 0.5, "float", "real", "an x")


def test_caps_are_stated_in_the_help():
    assert f"at most {MAX_CENTROIDS}" in config.BY_NAME["kmeans_clusters"].help
    assert f"at most {MAX_MEMORY}" in config.BY_NAME["memory_size"].help


# ------------------------------------------------------------------------ validation
def test_defaults_validate_and_resolve_per_axis():
    s = validate({})
    assert (s["tile_height"], s["tile_width"], s["stride_height"], s["stride_width"]) == (32, 32, 8, 8)
    s = validate({"tile": 16, "tile_width": 48, "stride": 4, "stride_height": 2})
    assert (s["tile_height"], s["tile_width"], s["stride_height"], s["stride_width"]) == (16, 48, 2, 4)
    s["storage_options"] = {"anon": True}  # callers amend the result in place


def test_aliases_and_manual_threshold():
    s = validate({"kmeans_random": 7})
    assert s["random_state"] == s["kmeans_random"] == 7
    assert validate({"kmeans_random": 7, "random_state": 3})["kmeans_random"] == 3
    with pytest.raises(ParameterError, match=r"random_state='x' must be an integer"):
        validate({"kmeans_random": "x"})
    with pytest.raises(ParameterError, match=r"needs threshold="):
        validate({"auto_threshold": False})
    assert validate({"auto_threshold": False, "threshold": 3})["threshold_mode"] == "manual"


@pytest.mark.parametrize("kwargs,message", [
    ({"tiel": 3}, r"unknown argument\(s\) \['tiel'\]; valid ones are \['auto_threshold'"),
    ({"tile": True}, r"tile=True must be an integer"),
    ({"tile": 4, "stride": 8}, r"stride_height=8 is larger than tile_height=4"),
    ({"kmeans_clusters": MAX_CENTROIDS + 1}, rf"kmeans_clusters=\d+ is out of range; it must be in \[1, {MAX_CENTROIDS}\]"),
    ({"kmeans_clusters": 4, "kmeans_neighbors": 5}, r"kmeans_neighbors=5 is out of range; it must be in \[1, 4\]"),
    ({"verbose": -1}, r"verbose=-1 is out of range; it must be >= 0"),
    ({"pca_variance": 0.0}, r"pca_variance=0.0 is out of range; it must be in \(0.0, 1.0\]"),
    ({"val_fraction": 1.0}, r"val_fraction=1.0 is out of range; it must be in \(0.0, 1.0\)"),
    ({"zscore": math.inf}, r"zscore=inf must be a finite number"),
    ({"upsample": 3}, r"upsample=3 is invalid; choose from \[1, 2, 4\]"),
    ({"calibration_groups": "x"}, r"choose from \['centroid', 'distance', 'global'\]"),
    ({"device": "gpu"}, r"device='gpu' is not a device name"),
    ({"overlay_color": (1, 2, 300)}, r"must be three integers in \[0, 255\]"),
    ({"layers": "layer2"}, r"layers='layer2' must be a list of stage names"),
    ({"weights": 3}, r"weights=3 must be 'imagenet', None"),
    ({"storage_options": "anon"}, r"storage_options='anon' must be a dict"),
    ({"chunk_size": 16}, r"chunk_size=16 is smaller than tile_height=32"),
    ({"nodata": "x"}, r"nodata='x' must be a number"),
])
def test_invalid_values_are_named(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        validate(kwargs)


def test_values_are_normalised():
    s = validate({"nodata": math.nan, "overlay_color": [1, 2, 3], "layers": ("a",), "cdf": 1, "memory_size": 0})
    assert math.isnan(s["nodata"]) and s["overlay_color"] == (1, 2, 3) and s["layers"] == ["a"]
    assert type(s["cdf"]) is float and s["memory_size"] == 0
    assert validate({"threshold_mode": None, "device": "cuda:1"})["device"] == "cuda:1"


def test_saved_params_leave_out_run_settings():
    saved = config.saved_params(validate({}))
    assert set(saved) == set(DEFAULTS) - set(RUNTIME)


# ------------------------------------------------------------------------ AnomalyDetector
def test_signature_matches_the_table():
    params = inspect.signature(AnomalyDetector).parameters
    assert list(params) == list(DEFAULTS)
    for p in PARAMS:
        arg = params[p.name]
        assert arg.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert arg.default == p.default and type(arg.default) is type(p.default), p.name
        assert arg.annotation == p.hint, p.name


def test_unknown_or_positional_arguments_are_refused():
    with pytest.raises(ParameterError, match=r"unknown argument\(s\) \['tiel'\]; valid ones are"):
        AnomalyDetector(tiel=32)
    with pytest.raises(TypeError):
        AnomalyDetector(32)


def test_get_and_set_params_as_in_scikit_learn():
    ad = AnomalyDetector(tile=16, weights=None)
    params = ad.get_params()
    assert params == {**DEFAULTS, "tile": 16, "weights": None}
    assert AnomalyDetector(**params).get_params() == params
    assert ad.set_params(stride=4, kmeans_clusters=9) is ad
    assert (ad.stride, ad.kmeans_clusters) == (4, 9)
    with pytest.raises(ParameterError, match=r"unknown argument\(s\) \['strid'\]"):
        ad.set_params(stride=2, strid=2)
    assert ad.stride == 4  # nothing set when one name is wrong

    class Handle:
        def get_params(self, deep: bool = True) -> dict[str, int]:
            return {"workers": 2}

    ad.set_params(client=Handle())
    assert ad.get_params()["client__workers"] == 2
    assert "client__workers" not in ad.get_params(deep=False)


# ------------------------------------------------------------------------ command line
@pytest.mark.parametrize("command", ["train", "detect", "evaluate"])
def test_cli_options_are_the_table(command):
    parser = _subparsers()[command]
    group = next(g for g in parser._action_groups if g.title == DETECTOR_GROUP)
    options = {a.dest: a for a in group._group_actions}
    expected = {p.name: p for p in config.options_for(command)}
    assert list(options) == list(expected)
    for name, action in options.items():
        assert action.option_strings[0] == expected[name].flag
    # no other option of the subcommand stands for a parameter (verbose is -v / -q)
    others = {a.dest for a in parser._actions if a not in group._group_actions}
    assert others & set(DEFAULTS) <= {"verbose"}


def test_cli_parses_into_valid_keyword_arguments():
    train = _subparsers()["train"]
    args = train.parse_args(["x", "--model", "m", "--tile", "16", "--no-auto-threshold", "--threshold", "2",
                             "--overlay-color", "1", "2", "3", "--weights", "none", "--upsample", "4",
                             "--layers", "a", "b", "--nodata", "nan", "--pca-variance", "0.5"])
    kw = {p.name: getattr(args, p.name) for p in PARAMS if hasattr(args, p.name)}
    assert kw["tile"] == 16 and kw["auto_threshold"] is False and kw["threshold"] == 2.0
    assert kw["overlay_color"] == [1, 2, 3] and kw["weights"] is None and kw["upsample"] == 4
    assert kw["layers"] == ["a", "b"] and math.isnan(kw["nodata"]) and kw["pca_variance"] == 0.5
    validate({**kw, "overlay_color": tuple(kw["overlay_color"])})
    assert not hasattr(train.parse_args(["x", "--model", "m"]), "tile")  # defaults come from the table


def test_help_texts_lose_their_markup():
    p = config.BY_NAME
    assert p["kmeans_random"].cli_help() == "alias of --random-state (default: none)"
    assert "%%" in p["zscore"].cli_help()  # argparse escaping
    assert "--threshold-mode manual" in p["auto_threshold"].cli_help()
    assert "`" not in p["features"].cli_help() and "'dense'" not in p["features"].cli_help()
    assert "(see Calibration)" in p["false_alarm_rate"].cli_help()


# ------------------------------------------------------------------------ README
def test_readme_table_is_generated_from_the_table():
    job = _readme_job()
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert job.with_table(text) == text, "README is out of date: run python jobs/update_readme_params.py"
    table = text.split(job.START, 1)[1].split(job.END, 1)[0]
    assert table.strip() == config.markdown_table().strip()
    for p in PARAMS:
        assert f"| `{p.name}` |" in table


def test_readme_job_rewrites_only_between_the_markers(tmp_path):
    job = _readme_job()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{job.START}\n| stale |\n{job.END}\nrest\n", encoding="utf-8")
    assert job.main(["--readme", str(readme), "--check"]) == 1
    assert job.main(["--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("rest\n") and "| stale |" not in text
    assert job.main(["--readme", str(readme), "--check"]) == 0
    with pytest.raises(ValueError, match="params:start"):
        job.with_table("no markers")
