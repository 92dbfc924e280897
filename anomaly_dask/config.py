"""The parameters of :class:`~anomaly_dask.AnomalyDetector`, declared once.

:data:`PARAMS` holds one :class:`Param` per keyword argument: its default, type, valid
values, whether it is a run setting, which ``anomaly-dask`` subcommands take it and the
sentence that explains it. Everything else is derived from that table:

* :data:`DEFAULTS` and :data:`RUNTIME`,
* :func:`validate`, which checks a set of arguments and resolves the dependent ones,
* the command-line options (:mod:`anomaly_dask.cli` reads :func:`options_for`),
* the README's parameter table (:func:`markdown_table`, written by
  ``jobs/update_readme_params.py``).

``tests/test_config.py`` checks that the signature of ``AnomalyDetector.__init__``, the
command line and the README agree with the table.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ParamSpec

from .calibration import GROUPINGS
from .errors import ParameterError

__all__ = [
    "BACKBONE_NAMES", "BY_NAME", "DEFAULTS", "KINDS", "MAX_CENTROIDS", "MAX_MEMORY", "PARAMS", "RUNTIME", "Param",
    "markdown_table", "options_for", "plain", "reject_unknown", "saved_params", "unknown_message",
    "validate",
]

#: Caps that keep a model's scoring cost bounded (checked for new models and loaded files).
MAX_CENTROIDS = 20_000
MAX_MEMORY = 200_000

#: Subcommands of ``anomaly-dask`` that take detector options.
TRAIN = ("train",)
EVERY_COMMAND = ("train", "detect", "evaluate")

#: Names of the backbones in :data:`anomaly_dask.backbones.BACKBONES`, repeated here so that
#: reading the parameter table (the command line's help) does not import torch;
#: ``tests/test_cli.py`` checks that the two agree.
BACKBONE_NAMES = ("efficientnet_lite0", "resnet18")

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

#: The kinds of value a parameter may hold; each has a check in :data:`_CHECKS`.
KINDS = ("int", "real", "choice", "flag", "rgb", "device", "weights", "stages", "nodata", "mapping", "object")


@dataclass(frozen=True)
class Param:
    """One keyword argument of :class:`~anomaly_dask.AnomalyDetector`.

    Attributes
    ----------
    name : str
        Keyword name; the command-line flag is ``--`` plus the name with dashes.
    default : object
        Default value (also the default of ``AnomalyDetector.__init__``).
    hint : str
        Type hint of the argument, exactly as written in ``AnomalyDetector.__init__``.
    kind : str
        One of :data:`KINDS`: how the value is checked and converted on the command line.
    help : str
        What the parameter means, in Markdown (`` `code` ``, ``*emphasis*``). The README
        shows it as it is, ``--help`` without the markup and with parameter names as flags.
    low, high : float or str, optional
        Range of ``int`` and ``real`` kinds; ``high`` may name another parameter whose
        resolved value is the bound. ``low`` defaults to 1 for integers.
    bounds : str
        Which ends of a ``real`` range are included: ``"[]"``, ``"()"``, ``"(]"`` or ``"[)"``.
    choices : tuple
        Valid values of the ``choice`` kind, in the order error messages list them.
    nullable : bool
        None is a valid value (kept as None; the default of such parameters).
    fallback : str, optional
        When the value is None it is taken from this parameter (checked under this name).
    alias_of : str, optional
        This parameter is another name of ``alias_of``; it takes that one's resolved value.
    runtime : bool
        A setting of a run, not of a model: never written to a model file, and a model file
        that holds one is refused.
    seed : bool
        The seed implementation had this argument, with the same meaning.
    commands : tuple of str
        ``anomaly-dask`` subcommands that take it as a detector option.
    shown : str, optional
        How the default is shown where its value would mislead (README and ``--help``).
    metavar : str or tuple of str, optional
        Placeholder of the value in ``--help``.
    """

    name: str
    default: Any
    hint: str
    kind: str
    help: str
    low: float | None = None
    high: float | str | None = None
    bounds: str = "[]"
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    fallback: str | None = None
    alias_of: str | None = None
    runtime: bool = False
    seed: bool = False
    commands: tuple[str, ...] = TRAIN
    shown: str | None = None
    metavar: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        if self.bounds not in ("[]", "()", "(]", "[)"):
            raise ValueError(f"{self.name}: bounds must be one of [], (), (], [)")
        if self.kind in ("real", "nodata") and (self.low is None or not isinstance(self.high, float)):
            raise ValueError(f"{self.name}: a real parameter needs a range (low and high)")

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--kmeans-clusters``."""
        return "--" + self.name.replace("_", "-")

    def default_text(self) -> str:
        """The default as the README shows it (Python literals, strings in backticks)."""
        if self.shown is not None:
            return self.shown
        return f"`{self.default!r}`" if isinstance(self.default, str) else repr(self.default)

    def cli_help(self) -> str:
        """The help text of the command-line option, with its default (argparse-escaped)."""
        if self.shown is not None:
            shown = self.shown
        elif self.default is None:
            shown = "none"
        elif isinstance(self.default, tuple):
            shown = " ".join(map(str, self.default))
        else:
            shown = str(self.default)
        return f"{plain(self.help)} (default: {shown})".replace("%", "%%")


#: Every keyword argument of ``AnomalyDetector``, in the order of its signature.
PARAMS: tuple[Param, ...] = (
    # --- the seed's arguments ---
    Param("tile", 32, "int", "int",
          "tile size in px; `tile_height` and `tile_width` override it per axis", seed=True),
    Param("tile_height", None, "int | None", "int", "tile height in px (overrides `tile`)",
          fallback="tile", seed=True),
    Param("tile_width", None, "int | None", "int", "tile width in px (overrides `tile`)",
          fallback="tile", seed=True),
    Param("stride", 8, "int", "int", "distance between tile corners in px (must be <= `tile`)", seed=True),
    Param("stride_height", None, "int | None", "int", "vertical stride in px (overrides `stride`)",
          fallback="stride", seed=True),
    Param("stride_width", None, "int | None", "int", "horizontal stride in px (overrides `stride`)",
          fallback="stride", seed=True),
    Param("cnn_batchsize", 1024, "int", "int", "tiles per forward pass in `patch` mode",
          commands=EVERY_COMMAND, seed=True, runtime=True),
    Param("device", None, "str | None", "device",
          "`None`/`'auto'`: CUDA if available, else CPU; `'cpu'`, `'cuda'`, `'cuda:<n>'`, `'mps'`",
          nullable=True, commands=EVERY_COMMAND, seed=True, runtime=True),
    Param("pca_variance", 0.95, "float", "real", "fraction of variance kept by PCA",
          low=0.0, high=1.0, bounds="(]", seed=True),
    Param("kmeans_clusters", 50, "int", "int",
          f"dictionary size (the seed used 10; at most {MAX_CENTROIDS})", high=MAX_CENTROIDS, seed=True),
    Param("kmeans_trials", 3, "int", "int", "k-means restarts when seeding the dictionary (the seed used 10)", seed=True),
    Param("kmeans_random", None, "int | None", "int", "alias of `random_state`",
          nullable=True, alias_of="random_state", seed=True),
    Param("kmeans_neighbors", 1, "int", "int",
          "a tile's score is the mean distance to this many nearest centroids",
          high="kmeans_clusters", seed=True),
    Param("threshold_mode", None, "str | None", "choice",
          "None: `false_alarm_rate`. The seed's rules, each a false-alarm rate: `'cdf'` marks "
          "`1 - cdf`; `'zscore'` marks the Gaussian tail beyond `zscore` (1.645: 5 %); `'manual'` "
          "thresholds at `threshold` in calibrated units (rate `10**-threshold`)",
          choices=("cdf", "zscore", "manual"), nullable=True, seed=True),
    Param("cdf", 0.95, "float", "real",
          "setting of `threshold_mode='cdf'`: it marks the share `1 - cdf` of normal pixels",
          low=0.0, high=1.0, seed=True),
    Param("zscore", 1.645, "float", "real",
          "setting of `threshold_mode='zscore'`: it marks the Gaussian tail beyond `zscore` (1.645: 5 %)",
          low=-40.0, high=40.0, seed=True),
    Param("threshold", None, "float | None", "real",
          "setting of `threshold_mode='manual'`: the threshold in calibrated units (-log10 of the "
          "share of normal pixels marked), e.g. 3; on the CLI `--threshold` alone sets it",
          low=0.0, high=300.0, nullable=True, seed=True, commands=EVERY_COMMAND),
    Param("auto_threshold", True, "bool", "flag", "False means `threshold_mode='manual'`", seed=True),
    Param("overlay_color", (255, 0, 0), "tuple[int, int, int]", "rgb",
          "overlay colour as R, G, B in [0, 255]", commands=EVERY_COMMAND, metavar=("R", "G", "B"),
          seed=True, runtime=True),
    Param("overlay_opacity", 0.75, "float", "real", "overlay opacity in [0, 1]",
          low=0.0, high=1.0, commands=EVERY_COMMAND, seed=True, runtime=True),
    Param("verbose", 1, "int", "int",
          "0 warnings only, 1 progress and counts, 2 debug (logger `anomaly_dask`; CLI: `-q`, `-v`, `-vv`)",
          low=0, commands=(), seed=True, runtime=True),
    Param("val_fraction", 0.2, "float", "real",
          "share of training images (or regions) used for validation without `val`",
          low=0.0, high=1.0, bounds="()", seed=True),
    # --- anomaly_dask's own ---
    Param("false_alarm_rate", 1e-3, "float", "real",
          "share of normal pixels marked: the threshold is `-log10(false_alarm_rate)` on calibrated "
          "scores (see *Calibration*)",
          low=0.0, high=1.0, bounds="()", commands=EVERY_COMMAND),
    Param("calibration_groups", "centroid", "str", "choice",
          "calibration groups: `'centroid'` (nearest centroid within each distance class to "
          "no-data), `'distance'` (distance class only) or `'global'` (one)",
          choices=tuple(GROUPINGS)),
    Param("memory_size", 10_000, "int", "int",
          "coreset of training tiles (scaled PCA space) a tile is scored against: its score is the "
          "distance to the nearest member; 0 scores by the nearest centroid as the seed did; "
          f"at most {MAX_MEMORY}",
          low=0, high=MAX_MEMORY),
    Param("runtime", "auto", "str", "choice",
          "what runs the CNN trunk: `'auto'` (OpenVINO on CPUs when installed, else torch), "
          "`'torch'` or `'openvino'`", choices=("auto", "torch", "openvino"),
          commands=EVERY_COMMAND, runtime=True),
    Param("features", "dense", "str", "choice",
          "`'dense'` (one pass per chunk) or `'patch'` (one pass per tile, as the paper)",
          choices=("dense", "patch")),
    Param("backbone", "efficientnet_lite0", "str", "choice",
          "CNN backbone: " + " or ".join(f"`{name!r}`" for name in sorted(BACKBONE_NAMES)),
          choices=tuple(sorted(BACKBONE_NAMES))),
    Param("weights", "imagenet", "str | None", "weights",
          "`'imagenet'`, `None` (random, seeded) or a path/URL to a state dict",
          nullable=True, metavar="imagenet|none|PATH"),
    Param("layers", None, "Sequence[str] | None", "stages", "stages pooled into dense tile features",
          nullable=True, shown="backbone default", metavar="STAGE"),
    Param("upsample", 2, "int", "choice", "dense mode: magnification before the backbone (1, 2 or 4)",
          choices=(1, 2, 4)),
    Param("gain_radius", 0, "int", "int",
          "half-width in px of the box whose mean brightness each pixel is divided by before the "
          "backbone: takes out survey-line gain, range fall-off and uneven lighting, keeps texture "
          "and objects smaller than the box; 0 keeps raw intensities",
          low=0, high=1024),
    Param("patch_size", 320, "int", "int", "patch mode: network input size per tile (the seed's 320)",
          low=32),
    Param("chunk_size", 1024, "int", "int", "processing chunk in px, also the chunk of the output store",
          commands=EVERY_COMMAND, runtime=True),
    Param("max_fit_tiles", 100_000, "int", "int", "most tile features held at once while fitting", low=2),
    Param("max_train_chunks", 256, "int", "int",
          "most training chunks visited (a random subset of larger inputs)"),
    Param("nodata", None, "float | None", "nodata",
          "no-data value (None: the TIFF's own tag; NaN always counts)",
          low=-1e300, high=1e300, nullable=True, commands=EVERY_COMMAND),
    Param("random_state", None, "int | None", "int", "seeds sampling, splits, PCA, k-means, random weights",
          low=0, nullable=True, fallback="kmeans_random"),
    Param("client", None, "Any", "object", "a `distributed.Client` to run on",
          nullable=True, commands=(), runtime=True),
    Param("storage_options", None, "dict | None", "mapping", "fsspec options for every path (CLI: `--storage-option KEY=VALUE`, repeatable)",
          nullable=True, commands=(), runtime=True),
)

#: The table by name.
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
#: Every keyword argument with its default.
DEFAULTS: dict[str, Any] = {p.name: p.default for p in PARAMS}
#: Settings of a run, not of a model: never written to a model file, and a model file that
#: holds one is refused (a file must not steer where data are read or written, or how).
RUNTIME: tuple[str, ...] = tuple(p.name for p in PARAMS if p.runtime)


def options_for(command: str) -> list[Param]:
    """The parameters that ``anomaly-dask <command>`` takes as options, in table order."""
    return [p for p in PARAMS if command in p.commands]


# ---------------------------------------------------------------------------- checks
def _range_error(p: Param, value: Any, text: str) -> ParameterError:
    return ParameterError(f"{p.name}={value!r} is out of range; it must be {text}")


def _check_int(p: Param, value: Any, out: Mapping[str, Any]) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ParameterError(f"{p.name}={value!r} must be an integer")
    low = 1 if p.low is None else int(p.low)
    high = out[p.high] if isinstance(p.high, str) else p.high
    if value < low or (high is not None and value > high):
        raise _range_error(p, value, f">= {low}" if high is None else f"in [{low}, {high}]")
    return int(value)


def _check_real(p: Param, value: Any, out: Mapping[str, Any]) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ParameterError(f"{p.name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ParameterError(f"{p.name}={value!r} must be a finite number")
    low, high = float(p.low or 0.0), float(p.high or 0.0)  # every real has both (__post_init__)
    low_open, high_open = p.bounds[0] == "(", p.bounds[1] == ")"
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        raise _range_error(p, value, f"in {p.bounds[0]}{low}, {high}{p.bounds[1]}")
    return float(value)


def _check_nodata(p: Param, value: Any, out: Mapping[str, Any]) -> float:
    if isinstance(value, Real) and not isinstance(value, bool) and math.isnan(value):
        return float("nan")
    return _check_real(p, value, out)


def _check_choice(p: Param, value: Any, out: Mapping[str, Any]) -> Any:
    if value not in p.choices:
        raise ParameterError(f"{p.name}={value!r} is invalid; choose from {list(p.choices)}")
    return value


def _check_rgb(p: Param, value: Any, out: Mapping[str, Any]) -> tuple[int, ...]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(isinstance(c, Integral) and 0 <= c <= 255 for c in value)
    ):
        raise ParameterError(f"{p.name}={value!r} must be three integers in [0, 255]")
    return tuple(int(c) for c in value)


def _check_device(p: Param, value: Any, out: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ParameterError(
            f"{p.name}={value!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:<n>' or 'mps'"
        )
    return value


def _check_weights(p: Param, value: Any, out: Mapping[str, Any]) -> str:
    if not isinstance(value, str):
        raise ParameterError(
            f"{p.name}={value!r} must be 'imagenet', None (random) or a path/URL to a state dict"
        )
    return value


def _check_stages(p: Param, value: Any, out: Mapping[str, Any]) -> list[str]:
    if isinstance(value, str) or not all(isinstance(x, str) for x in value):
        raise ParameterError(f"{p.name}={value!r} must be a list of stage names")
    return list(value)


def _check_mapping(p: Param, value: Any, out: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ParameterError(f"{p.name}={value!r} must be a dict of fsspec options")
    return value


def _keep(p: Param, value: Any, out: Mapping[str, Any]) -> Any:
    return value


#: Check of each kind: ``(param, value, settings resolved so far) -> resolved value``.
_CHECKS: dict[str, Callable[[Param, Any, Mapping[str, Any]], Any]] = {
    "int": _check_int, "real": _check_real, "nodata": _check_nodata, "choice": _check_choice,
    "rgb": _check_rgb, "device": _check_device, "weights": _check_weights, "stages": _check_stages,
    "mapping": _check_mapping, "flag": _keep, "object": _keep,
}


def _tiles_cover_the_image(out: dict[str, Any]) -> None:
    for axis in ("height", "width"):
        if out[f"stride_{axis}"] > out[f"tile_{axis}"]:
            raise ParameterError(
                f"stride_{axis}={out[f'stride_{axis}']} is larger than tile_{axis}="
                f"{out[f'tile_{axis}']}: tiles would leave pixels unscored; use a stride <= the tile"
            )


def _manual_threshold(out: dict[str, Any]) -> None:
    if not out["auto_threshold"]:
        out["threshold_mode"] = "manual"
    if out["threshold_mode"] == "manual" and out["threshold"] is None:
        raise ParameterError(
            "threshold_mode='manual' (or auto_threshold=False) needs threshold=<calibrated score>, "
            "e.g. threshold=3 marks pixels scoring like 1 normal pixel in 1000"
        )


def _chunk_holds_a_tile(out: dict[str, Any]) -> None:
    for axis in ("height", "width"):
        if out["chunk_size"] < out[f"tile_{axis}"]:
            raise ParameterError(
                f"chunk_size={out['chunk_size']} is smaller than tile_{axis}="
                f"{out[f'tile_{axis}']}; use a chunk of at least one tile"
            )


#: Rules between parameters, applied in this order once every parameter is checked.
RULES: tuple[Callable[[dict[str, Any]], None], ...] = (
    _tiles_cover_the_image, _manual_threshold, _chunk_holds_a_tile,
)


def unknown_message(unknown: list[str]) -> str:
    """The error message for keyword names that are not parameters."""
    return f"unknown argument(s) {unknown}; valid ones are {sorted(DEFAULTS)}"


def validate(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Check every argument and return the resolved settings.

    Missing arguments take their defaults. Resolves per-axis tile and stride, the
    ``kmeans_random`` alias of ``random_state`` and ``auto_threshold=False`` (meaning a
    manual threshold).

    Parameters
    ----------
    kwargs : mapping of str to object
        Keyword arguments of :class:`~anomaly_dask.AnomalyDetector` (any subset).

    Returns
    -------
    dict
        Every parameter, in table order, with its checked and resolved value.

    Raises
    ------
    ParameterError
        Naming the argument, its value and the valid range.
    """
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise ParameterError(unknown_message(unknown))
    out: dict[str, Any] = {**DEFAULTS, **kwargs}
    for p in PARAMS:
        if p.alias_of is not None:
            continue
        value = out[p.name]
        if value is None and p.fallback is not None:
            value = out[p.fallback]
        if value is None and p.nullable:
            out[p.name] = None
            continue
        out[p.name] = _CHECKS[p.kind](p, value, out)
    for p in PARAMS:
        if p.alias_of is not None:
            out[p.name] = out[p.alias_of]
    for rule in RULES:
        rule(out)
    return out


def saved_params(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings worth storing in a model file (JSON-serialisable, no runtime handles)."""
    return {k: v for k, v in settings.items() if k not in RUNTIME}


_P = ParamSpec("_P")


def reject_unknown(init: Callable[_P, None]) -> Callable[_P, None]:
    """Make ``__init__`` refuse unknown keywords with a :class:`ParameterError`.

    Python raises a bare TypeError for an unexpected keyword; this names the valid ones
    instead. The wrapped signature stays the visible one (``inspect.signature``, IDEs).
    """

    @functools.wraps(init)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> None:
        unknown = sorted(set(kwargs) - set(DEFAULTS))
        if unknown:
            raise ParameterError(unknown_message(unknown))
        init(*args, **kwargs)

    return checked


# ---------------------------------------------------------------------------- rendering
_CODE = re.compile(r"`([^`]*)`")
_EMPHASIS = re.compile(r"\*([^*\s][^*]*)\*")
_SETTING = re.compile(r"(\w+)=(.+)")


def _unquote(text: str) -> str:
    return text[1:-1] if re.fullmatch(r"'[^']*'", text) else text


def plain(text: str) -> str:
    """A help text without Markdown, as ``--help`` shows it.

    Parameter names in backticks become their flags, quoted literals lose their quotes
    (``'dense'`` -> ``dense``, as typed on the command line), ``name='value'`` becomes
    ``--name value`` and emphasis loses its asterisks.
    """
    out = []
    for k, part in enumerate(_CODE.split(text)):
        if k % 2 == 0:  # prose
            out.append(_EMPHASIS.sub(r"\1", part))
        elif part in BY_NAME:
            out.append(BY_NAME[part].flag)
        elif (m := _SETTING.fullmatch(part)) and m[1] in BY_NAME:
            out.append(f"{BY_NAME[m[1]].flag} {_unquote(m[2])}")
        else:
            out.append(_unquote(part))
    return "".join(out)


def markdown_table() -> str:
    """The README's table of parameters (Markdown, one row per parameter, ending in a newline).

    Columns: name, default, whether the seed had it, whether it is a run setting, the
    ``anomaly-dask`` subcommands that take it as ``--name-with-dashes``, and its meaning.
    """
    rows = ["| argument | default | seed | run | CLI | meaning |", "|---|---|---|---|---|---|"]
    for p in PARAMS:
        seed, run = "yes" if p.seed else "", "yes" if p.runtime else ""
        commands = ", ".join(p.commands) or "-"
        meaning = p.help.replace("|", "\\|")
        rows.append(f"| `{p.name}` | {p.default_text()} | {seed} | {run} | {commands} | {meaning} |")
    return "\n".join(rows) + "\n"
