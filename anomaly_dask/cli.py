"""``anomaly-dask``: train a model and detect anomalies in large images from the shell.

Building the parser imports nothing heavy (no torch, dask or zarr), so ``--help`` is quick;
each command imports what it needs when it runs. Typical commands are in :data:`EXAMPLES`.
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

from . import __version__
from .cli_contacts import add_contacts_parser, add_export_options, contacts_command, export_kwargs
from .cli_support import CliError, cli_terms, find_inputs, json_default, stores_for
from .config import PARAMS, Param, options_for

__all__ = [
    "CliError", "build_parser", "main", "make_local_folder", "output_for", "parse_storage_options",
]

PROG = "anomaly-dask"

#: Shown at the end of ``anomaly-dask --help``.
EXAMPLES = """\
examples:
  anomaly-dask train normal/ --val val/ --model model.safetensors --random-state 0
  anomaly-dask detect model.safetensors scans/ 'more/*.tif' --output out/ --geotiff mask
  anomaly-dask detect model.safetensors s3://bucket/big.tif --output s3://bucket/out/ \\
      --scheduler tcp://head:8786 --storage-option anon=false
  anomaly-dask evaluate model.safetensors test/ --ground-truth gt/ --output report/ --json

Run 'anomaly-dask COMMAND --help' for the options of each command."""

#: Shown at the end of ``anomaly-dask detect --help``.
DETECT_EXAMPLES = """\
examples:
  anomaly-dask detect model.safetensors scan.tif --output scan.zarr
  anomaly-dask detect model.safetensors scans/ --output out/      # out/<sub-folder>/<name>.zarr
  anomaly-dask detect model.safetensors 'data/**/*.tif' s3://b/x.zarr --output out/ --json
  DASK_SCHEDULER_ADDRESS=tcp://head:8786 anomaly-dask detect model.safetensors big.tif --output out/"""


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
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="address of a running Dask scheduler (default: $DASK_SCHEDULER_ADDRESS, or "
                            "dask's scheduler-address setting; without any, a local cluster is started)")
    where.add_argument("--scheduler-file", metavar="FILE", help="scheduler file of a running Dask cluster")
    group.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="seconds to wait for --scheduler / --scheduler-file (default: 10)")
    group.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes of the local cluster started otherwise (default: 1)")
    group.add_argument("--threads-per-worker", type=int, default=None, metavar="T",
                       help="task threads per local worker (default: 2 when each worker has 2 cores "
                            "or more, else 1)")
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
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only (no progress bars)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON summary object on stdout; other messages go to stderr")


def build_parser() -> argparse.ArgumentParser:
    """The ``anomaly-dask`` argument parser with its ``train`` and ``detect`` subcommands."""
    parser = _Parser(
        prog=PROG, description="CNN-tile anomaly detection for very large images on Dask.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,detect,contacts,evaluate,keygen}", required=True)
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
                            description="Score images chunk by chunk into zarr stores (resumable).",
                            epilog=DETECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    detect.add_argument("model", metavar="MODEL", help="model file written by train")
    detect.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="images (TIFF, zarr, PNG, ...), folders (searched recursively; a zarr "
                             "store is one image) or quoted patterns ('data/*.tif'); paths or URLs")
    detect.add_argument("--output", required=True, metavar="OUT",
                        help="output folder/URL prefix (<OUT>/<relative path of the image>.zarr per "
                             "image), or a .zarr store for a single image")
    detect.add_argument("--png-tiles", action="store_true", help="also write overlay PNG tiles")
    add_export_options(detect)
    detect.add_argument("--overwrite", action="store_true",
                        help="replace stores written by another model or parameters, and files "
                             "beside them that they did not write")
    detect.add_argument("--no-quicklook", action="store_true", help="do not write <name>_quicklook.png")
    _add_trusted_key(detect)
    _add_common_options(detect)
    _add_detector_options(detect, "detect")

    add_contacts_parser(sub)
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
    """Store URL of each image file: ``output`` itself for one input ending in ``.zarr``,
    otherwise ``<output>/<stem>.zarr`` (see :func:`~anomaly_dask.cli_support.stores_for`)."""
    return stores_for([(i, _stem(i)) for i in inputs], output)


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


def _tqdm(total: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="chunk", file=sys.stderr, dynamic_ncols=True)


class _Bar:
    """tqdm progress bar of chunks (done / total, ETA) for one input."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.bar = label, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = _tqdm(total, self.label)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _StepBars:
    """``progress(step, done, total)`` of training as one tqdm bar per step, each closed
    when the next step starts."""

    LABELS = {"sample": "sampling features", "fit": "fitting dictionary", "calibrate": "calibrating"}

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.step, self.bar = enabled, None, None

    def __call__(self, step: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if step != self.step:
            self.close()
            self.step, self.bar = step, _tqdm(total, self.LABELS.get(step, step))
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _say(args: argparse.Namespace, text: str) -> None:
    """A message for people: on stdout, or on stderr with ``--json`` (stdout is redirected)."""
    if not args.quiet:
        print(text, flush=True)


def _keygen(args: argparse.Namespace) -> int:
    from .signing import write_keypair

    private, public, kid = write_keypair(args.prefix)
    print(f"key {kid}: private {private} (keep it secret), public {public}", flush=True)
    return 0


def scheduler_address(scheduler: str | None, scheduler_file: str | None) -> str | None:
    """``--scheduler``, else (without ``--scheduler-file``) ``$DASK_SCHEDULER_ADDRESS`` or
    dask's ``scheduler-address`` setting; None starts a local cluster."""
    if scheduler or scheduler_file:
        return scheduler
    env = os.environ.get("DASK_SCHEDULER_ADDRESS", "").strip()
    if env:
        return env
    import dask

    return dask.config.get("scheduler-address", None) or None


def _contacts(args: argparse.Namespace, emit: Any) -> int:
    summary = contacts_command(args, parse_storage_options(args.storage_option))
    _say(args, f"{summary['contacts']} contact(s) at threshold {summary['threshold']:.4g} "
               f"(false-alarm rate {summary['false_alarm_rate']:.3g}): {', '.join(summary['files'].values())}")
    if args.json:
        emit(_dumps(summary))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        return _keygen(args)
    if args.command == "contacts":
        if not args.json:
            return _contacts(args, print)
        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return _contacts(args, lambda text: print(text, file=stdout, flush=True))
    if not args.json:
        return _command(args, print)
    stdout = sys.stdout

    def emit(text: str) -> None:
        print(text, file=stdout, flush=True)

    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON object only
        return _command(args, emit)


def _command(args: argparse.Namespace, emit: Any) -> int:
    """Run ``train``, ``detect`` or ``evaluate``; ``emit`` prints the JSON summary (with
    ``--json``; ``evaluate`` always prints its metrics)."""
    from .compute import connect
    from .detector import AnomalyDetector

    verbose = _setup_logging(args)
    signing_key = None
    if getattr(args, "signing_key", None):
        from .signing import load_private_key

        signing_key = load_private_key(args.signing_key)  # before training, not after it
    options = parse_storage_options(args.storage_option)
    detector_kw = {p.name: getattr(args, p.name) for p in PARAMS if p.commands and hasattr(args, p.name)}
    if "overlay_color" in detector_kw:
        detector_kw["overlay_color"] = tuple(detector_kw["overlay_color"])
    if getattr(args, "threshold", None) is not None:
        detector_kw.update(threshold_mode="manual", threshold=args.threshold)
    exports = export_kwargs(args) if args.command == "detect" else {}
    if args.performance_report:
        try:
            import bokeh  # noqa: F401 - distributed.performance_report renders with bokeh
        except ImportError:
            raise CliError("--performance-report needs bokeh: pip install 'bokeh>=3.1'") from None
    # Everything that can be refused is refused before a cluster starts: the parameters, the
    # model file (loaded and checked here; the client is attached below), the inputs, the outputs.
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
        found = find_inputs(args.inputs, options)
        stores = stores_for(found, args.output)
        for parent in dict.fromkeys(store.rsplit("/", 1)[0] if "/" in store else "." for store in stores):
            make_local_folder(parent, options)  # <OUT> and the sub-folders of nested names
    address = scheduler_address(args.scheduler, args.scheduler_file)
    if address and not args.scheduler:
        _say(args, f"scheduler {address} (from DASK_SCHEDULER_ADDRESS / dask config)")
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(connect(
            address, args.scheduler_file, workers=args.workers,
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
            bars = _StepBars(enabled=not args.quiet)
            try:
                ad = AnomalyDetector(**detector_kw, **common, storage_options=options).train(
                    args.train, args.val, progress=bars,
                )
            finally:
                bars.close()
            fp = ad.save(args.model, storage_options=options, signing_key=signing_key)
            seconds = time.perf_counter() - t0
            _say(args, f"model {args.model} (fingerprint {fp[:12]}): threshold {ad.threshold_:.4f}, "
                       f"{ad.n_components_} PCA components, {seconds:.1f} s")
            if args.json:
                emit(_dumps({
                    "model": args.model, "fingerprint": fp, "threshold": ad.threshold_,
                    "false_alarm_rate": ad.false_alarm_rate_, "n_components": ad.n_components_,
                    "centroids": len(ad.dictionary_.centroids), "input_dtype": ad.input_dtype_,
                    "seconds": seconds,
                }))
            return 0
        ad.client = client
        if args.command == "evaluate":
            result = ad.evaluate(args.test, args.ground_truth, args.output, overlays=not args.no_overlays)
            overall = {k: v for k, v in result.items() if k not in ("images", "report")}
            emit(_dumps(overall))
            _say(args, f"AUROC {result['auroc']:.4f}, AUPRO {result['aupro']:.4f}, F1 {result['f1'] or 0:.3f}, "
                       f"normal pixels marked {result['normal_marked']:.4%} (model promises "
                       f"{ad.false_alarm_rate_:.4%}); report in {args.output}")
            return 0
        pixels = anomalous = valid = 0
        images = []
        for (image, stem), store in zip(found, stores):
            bar = _Bar(stem, enabled=not args.quiet)
            try:
                summary = ad.detect(
                    image, store, png_tiles=args.png_tiles, quicklook=not args.no_quicklook,
                    overwrite=args.overwrite, storage_options=options, progress=bar, **exports,
                )
            finally:
                bar.close()
            images.append({"input": image, "store": store, **summary})
            pixels += summary["height"] * summary["width"]
            valid += summary["valid_pixels"]
            anomalous += summary["anomalous_pixels"]
            _say(args, f"{image} -> {store}: {summary['anomalous_fraction']:.3%} anomalous, "
                       f"{summary['chunks']} chunks ({summary['computed_chunks']} scored, "
                       f"{summary['redrawn_chunks']} redrawn), {summary.get('contacts', 0)} contacts, "
                       f"{summary['seconds']:.1f} s")
        seconds = time.perf_counter() - t0
        _say(args, f"done: {len(stores)} image(s), {pixels / 1e6:.2f} Mpx, "
                   f"{anomalous / max(valid, 1):.3%} anomalous, {seconds:.1f} s, "
                   f"{pixels / 1e6 / seconds:.2f} Mpx/s")
        if args.json:
            emit(_dumps({
                "images": images, "pixels": pixels, "valid_pixels": valid, "anomalous_pixels": anomalous,
                "anomalous_fraction": anomalous / max(valid, 1), "seconds": seconds,
            }))
    return 0


def _dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, default=json_default)


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
        message = cli_terms(" ".join(str(exc).split())) or type(exc).__name__
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
