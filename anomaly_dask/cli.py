"""``anomaly-dask``: train a model and detect anomalies in large images from the shell.

Examples
--------
::

    anomaly-dask train normal/ --val val/ --model model.safetensors --random-state 0
    anomaly-dask detect model.safetensors a.tif b.tif --output s3://bucket/out/ \\
        --scheduler tcp://head:8786 --geotiff mask --storage-option anon=false
    anomaly-dask evaluate model.safetensors test/ --ground-truth gt/ --output report/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from .config import PARAMS, Param, options_for

__all__ = ["build_parser", "main", "make_local_folder", "output_for", "parse_storage_options"]

PROG = "anomaly-dask"


class CliError(Exception):
    """A user error reported as one line with exit code 1."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``anomaly-dask: error: <reason>``."""

    def error(self, message: str) -> Any:  # noqa: D102 - argparse API
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"{PROG}: error: {where}{message} (see --help)\n")


def _weights(value: str) -> str | None:
    return None if value.lower() == "none" else value


def _option(p: Param) -> dict[str, Any]:
    """``add_argument`` keywords of a detector option, from its row of the parameter table."""
    kw: dict[str, Any] = {"dest": p.name, "default": argparse.SUPPRESS, "help": p.cli_help()}
    if p.metavar is not None:
        kw["metavar"] = p.metavar
    if p.kind == "flag":
        kw["action"] = argparse.BooleanOptionalAction
    elif p.kind == "rgb":
        kw.update(nargs=3, type=int)
    elif p.kind == "stages":
        kw["nargs"] = "+"
    elif p.kind == "weights":
        kw["type"] = _weights
    elif p.kind == "choice":
        kw.update(choices=list(p.choices), type=type(p.choices[0]))
    else:
        kw["type"] = {"int": int, "real": float, "nodata": float, "device": str}[p.kind]
    return kw


def _add_detector_options(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group("detector options (AnomalyDetector keyword arguments)")
    for p in options_for(command):
        group.add_argument(p.flag, **_option(p))


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster and storage")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler")
    where.add_argument("--scheduler-file", metavar="FILE", help="scheduler file of a running Dask cluster")
    group.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="seconds to wait for --scheduler / --scheduler-file (default: 10)")
    group.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes of the local cluster started otherwise (default: 1)")
    group.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                       help="task threads per local worker (default: 1)")
    group.add_argument("--torch-threads", type=int, default=None, metavar="N",
                       help="torch threads per task thread (default: the worker's share of the cores)")
    group.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="fsspec option, repeatable; VALUE parsed as JSON when possible, dotted "
                            "keys nest (client_kwargs.endpoint_url=http://...)")
    group.add_argument("--performance-report", metavar="FILE.html",
                       help="write a Dask performance report")
    group.add_argument("--no-env-check", action="store_true",
                       help="skip the client/worker package version check")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more output (-v progress logs, -vv debug and tracebacks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only")


def build_parser() -> argparse.ArgumentParser:
    """The ``anomaly-dask`` argument parser with its ``train`` and ``detect`` subcommands."""
    parser = _Parser(
        prog=PROG, description="CNN-tile anomaly detection for very large images on Dask.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,detect,evaluate,keygen}", required=True)
    train = sub.add_parser("train", help="learn a model from anomaly-free images",
                           description="Learn a model from anomaly-free images and save it.")
    train.add_argument("train", metavar="TRAIN", help="training image or folder (path or URL)")
    train.add_argument("--val", metavar="VAL", help="validation image or folder for the threshold")
    train.add_argument("--model", required=True, metavar="OUT_MODEL", help="model file to write (.safetensors)")
    train.add_argument("--signing-key", metavar="PATH",
                       help="sign the model with this Ed25519 private key (PEM, from anomaly-dask keygen)")
    _add_common_options(train)
    _add_detector_options(train, "train")

    detect = sub.add_parser("detect", help="score large images into zarr stores",
                            description="Score images chunk by chunk into zarr stores (resumable).")
    detect.add_argument("model", metavar="MODEL", help="model file written by train")
    detect.add_argument("inputs", nargs="+", metavar="INPUT", help="images (TIFF, zarr, PNG, ...; paths or URLs)")
    detect.add_argument("--output", required=True, metavar="OUT",
                        help="output folder/URL prefix (<OUT>/<stem>.zarr per input), or a .zarr "
                             "store for a single input")
    detect.add_argument("--png-tiles", action="store_true", help="also write overlay PNG tiles")
    detect.add_argument("--geotiff", nargs="+", choices=["mask", "score"], default=None,
                        help="also write <store>/<name>.tif with the input's georeference")
    detect.add_argument("--overwrite", action="store_true",
                        help="replace stores written by another model or parameters")
    detect.add_argument("--no-quicklook", action="store_true", help="do not write quicklook.png")
    _add_trusted_key(detect)
    _add_common_options(detect)
    _add_detector_options(detect, "detect")

    evaluate = sub.add_parser(
        "evaluate", help="score test images against ground-truth masks",
        description="Score test images against pixel ground truth (chunk by chunk) and write "
                    "metrics.json plus ROC / PRO / histogram pictures and overlays with GT contours.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="model file written by train")
    evaluate.add_argument("test", metavar="TEST", help="test image, mosaic or folder (path or URL)")
    evaluate.add_argument("--ground-truth", required=True, metavar="GT",
                          help="mask file, or folder of masks named after the test images "
                               "(<stem>.*, <stem>_mask.*, <stem>_gt.*); 0 normal, one positive value anomalous")
    evaluate.add_argument("--output", required=True, metavar="DIR", help="report folder/URL")
    evaluate.add_argument("--no-overlays", action="store_true", help="do not write per-image overlays")
    _add_trusted_key(evaluate)
    _add_common_options(evaluate)
    _add_detector_options(evaluate, "evaluate")

    keygen = sub.add_parser(
        "keygen", help="make an Ed25519 key pair for signing models",
        description="Write OUT_PREFIX.pem (private key, mode 0600; give it to train --signing-key) "
                    "and OUT_PREFIX.pub.pem (public key; give it to detect/evaluate --trusted-key).",
    )
    keygen.add_argument("prefix", metavar="OUT_PREFIX", help="path of the key files without extension")
    return parser


def _add_trusted_key(parser: argparse.ArgumentParser) -> None:
    """The ``--trusted-key`` option of the subcommands that load a model."""
    parser.add_argument("--trusted-key", dest="trusted_keys", action="append", default=None, metavar="PATH",
                        help="load the model only if signed by this Ed25519 public key (PEM); repeatable")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_storage_options(items: Sequence[str]) -> dict[str, Any] | None:
    """``["key=value", "a.b=1"]`` -> ``{"key": "value", "a": {"b": 1}}`` (None when empty)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--storage-option {item!r} must look like KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CliError(f"--storage-option {item!r} conflicts with an earlier value of {part!r}")
        node[leaf] = _parse_value(value)
    return out or None


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".zarr", ".tiff", ".tif", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def output_for(inputs: Sequence[str], output: str) -> list[str]:
    """Store URL of each input: ``output`` itself for one input ending in ``.zarr``,
    otherwise ``<output>/<stem>.zarr``."""
    if len(inputs) == 1 and output.rstrip("/").endswith(".zarr"):
        return [output.rstrip("/")]
    stems = [_stem(i) for i in inputs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise CliError(f"several inputs share the name(s) {dup}; run them into separate outputs")
    base = output.rstrip("/")
    return [f"{base}/{s}.zarr" for s in stems]


def check_model_target(url: str, options: dict[str, Any] | None) -> None:
    """Fail before training when the model file could not be written afterwards."""
    import fsspec

    from .outputs import check_writable

    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    if fs.isdir(path):
        raise CliError(f"--model {url!r} is a folder; give a file name such as {url.rstrip('/')}/model.safetensors")
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    check_writable(fs, parent, url)


def make_local_folder(url: str, options: dict[str, Any] | None) -> None:
    """Create the output prefix when it is a local folder (object stores need none)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(path, exist_ok=True)


def _setup_logging(args: argparse.Namespace) -> int:
    verbose = 0 if args.quiet else min(args.verbose, 2)
    logging.getLogger("distributed").setLevel(logging.ERROR if verbose < 2 else logging.INFO)
    return verbose


class _Bar:
    """tqdm progress bar of chunks (done / total, ETA) for one input."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.bar = label, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="chunk", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _keygen(args: argparse.Namespace) -> int:
    from .signing import write_keypair

    private, public, kid = write_keypair(args.prefix)
    print(f"key {kid}: private {private} (keep it secret), public {public}", flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .compute import connect
    from .detector import AnomalyDetector

    if args.command == "keygen":
        return _keygen(args)
    verbose = _setup_logging(args)
    signing_key = None
    if getattr(args, "signing_key", None):
        from .signing import load_private_key

        signing_key = load_private_key(args.signing_key)  # before training, not after it
    options = parse_storage_options(args.storage_option)
    detector_kw = {p.name: getattr(args, p.name) for p in PARAMS if p.commands and hasattr(args, p.name)}
    if "overlay_color" in detector_kw:
        detector_kw["overlay_color"] = tuple(detector_kw["overlay_color"])
    if args.performance_report:
        try:
            import bokeh  # noqa: F401 - distributed.performance_report renders with bokeh
        except ImportError:
            raise CliError("--performance-report needs bokeh: pip install 'bokeh>=3.1'") from None
    # Everything that can be refused is refused before a cluster starts: the parameters, the
    # model file (loaded and checked here; the client is attached below), the outputs.
    if args.command == "train":
        AnomalyDetector(**detector_kw, verbose=verbose, storage_options=options)._settings()
        check_model_target(args.model, options)
        ad = None
    else:
        ad = AnomalyDetector.load(
            args.model, storage_options=options, trusted_keys=args.trusted_keys, **detector_kw,
            verbose=verbose,
        )
    if args.command == "detect":
        stores = output_for(args.inputs, args.output)
        if stores[0] != args.output.rstrip("/"):
            make_local_folder(args.output, options)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(connect(
            args.scheduler, args.scheduler_file, workers=args.workers,
            threads_per_worker=args.threads_per_worker, torch_threads=args.torch_threads,
            timeout=args.connect_timeout, check=not args.no_env_check,
        ))
        n_workers = len(client.nthreads())
        _say(args, f"dashboard: {client.dashboard_link} ({n_workers} workers, "
                   f"{sum(client.nthreads().values())} threads)")
        if args.performance_report:
            from .compute import performance_report

            stack.enter_context(performance_report(args.performance_report))
        common = {"client": client, "verbose": verbose}
        t0 = time.perf_counter()
        if args.command == "train":
            ad = AnomalyDetector(**detector_kw, **common, storage_options=options).train(args.train, args.val)
            fp = ad.save(args.model, storage_options=options, signing_key=signing_key)
            _say(args, f"model {args.model} (fingerprint {fp[:12]}): threshold {ad.threshold_:.4f}, "
                       f"{ad.n_components_} PCA components, {time.perf_counter() - t0:.1f} s")
            return 0
        ad.client = client
        if args.command == "evaluate":
            result = ad.evaluate(args.test, args.ground_truth, args.output, overlays=not args.no_overlays)
            overall = {k: v for k, v in result.items() if k not in ("images", "report")}
            print(json.dumps(overall, default=str))
            _say(args, f"AUROC {result['auroc']:.4f}, AUPRO {result['aupro']:.4f}, F1 {result['f1'] or 0:.3f}, "
                       f"normal pixels marked {result['normal_marked']:.4%} (model promises "
                       f"{ad.false_alarm_rate_:.4%}); report in {args.output}")
            return 0
        pixels = anomalous = valid = 0
        for image, store in zip(args.inputs, stores):
            bar = _Bar(_stem(image), enabled=not args.quiet)
            try:
                summary = ad.detect(
                    image, store, png_tiles=args.png_tiles, quicklook=not args.no_quicklook,
                    geotiff=tuple(args.geotiff or ()), overwrite=args.overwrite,
                    storage_options=options, progress=bar,
                )
            finally:
                bar.close()
            pixels += summary["height"] * summary["width"]
            valid += summary["valid_pixels"]
            anomalous += summary["anomalous_pixels"]
            _say(args, f"{image} -> {store}: {summary['anomalous_fraction']:.3%} anomalous, "
                       f"{summary['chunks']} chunks ({summary['computed_chunks']} computed), "
                       f"{summary['seconds']:.1f} s")
        seconds = time.perf_counter() - t0
        _say(args, f"done: {len(stores)} image(s), {pixels / 1e6:.2f} Mpx, "
                   f"{anomalous / max(valid, 1):.3%} anomalous, {seconds:.1f} s, "
                   f"{pixels / 1e6 / seconds:.2f} Mpx/s")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from .errors import AnomalyDaskError

    return (CliError, AnomalyDaskError, FileNotFoundError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomaly-dask`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except _user_errors() as exc:
        if getattr(args, "verbose", 0) >= 2:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug must still end in one line, not a traceback
        if getattr(args, "verbose", 0) >= 2:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"{PROG}: error: internal error ({type(exc).__name__}: {message}); rerun with -vv "
              f"for the traceback and please report it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
