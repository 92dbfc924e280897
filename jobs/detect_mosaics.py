"""Cluster job: train on normal mosaics, then detect anomalies in many mosaics.

Trains one model on one or more anomaly-free mosaics (``--train``, repeatable; optional
``--val``), saves it, then scores every ``INPUT`` into ``<output>/<stem>.zarr`` with a
quick-look PNG and GeoTIFFs (mask by default), on an existing Dask cluster
(``--scheduler`` / ``--scheduler-file``) or a local one. Completed chunks are skipped when a
run is repeated (resume). With ``--model`` pointing at an existing file and no ``--train``,
training is skipped.

Usage::

    python jobs/detect_mosaics.py --train normal1.tif --train normal2.tif \\
        --model s3://bucket/model.safetensors --output s3://bucket/results/ \\
        --scheduler tcp://head:8786 survey/*.tif [--geotiff mask score] [--chunk-size 1024]
"""

from __future__ import annotations

import argparse
import sys
import time

from anomaly_dask import AnomalyDetector
from anomaly_dask.cli import make_local_folder, output_for, parse_storage_options
from anomaly_dask.compute import connect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the job."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="mosaics to score (paths or URLs)")
    p.add_argument("--train", action="append", default=[], help="anomaly-free mosaic (repeatable)")
    p.add_argument("--val", action="append", default=None, help="validation mosaic (repeatable)")
    p.add_argument("--model", required=True, help="model file to write (or to read without --train)")
    p.add_argument("--output", required=True, help="output folder / URL prefix")
    p.add_argument("--geotiff", nargs="*", default=["mask"], choices=["mask", "score"])
    p.add_argument("--png-tiles", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--weights", default="imagenet", help="imagenet, none or a state-dict path")
    p.add_argument("--random-state", type=int, default=0)
    p.add_argument("--scheduler", help="address of a running Dask scheduler")
    p.add_argument("--scheduler-file", help="scheduler file of a running Dask cluster")
    p.add_argument("--workers", type=int, default=1, help="local worker processes otherwise")
    p.add_argument("--threads-per-worker", type=int, default=None, help="default: 2 where each worker has 2 cores or more, else 1")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train (unless only a model is given) and detect on every input; print a summary."""
    args = parse_args(argv)
    options = parse_storage_options(args.storage_option)
    stores = output_for(args.inputs, args.output.rstrip("/") + "/")
    make_local_folder(args.output, options)
    weights = None if args.weights.lower() == "none" else args.weights
    with connect(args.scheduler, args.scheduler_file, workers=args.workers,
                 threads_per_worker=args.threads_per_worker) as client:
        print(f"dashboard: {client.dashboard_link}", flush=True)
        t0 = time.perf_counter()
        if args.train:
            ad = AnomalyDetector(
                weights=weights, random_state=args.random_state, chunk_size=args.chunk_size,
                client=client, storage_options=options,
            ).train(args.train, args.val)
            ad.save(args.model)
            print(f"trained in {time.perf_counter() - t0:.1f} s; threshold {ad.threshold_:.4f}")
        ad = AnomalyDetector.load(args.model, storage_options=options, client=client,
                                  chunk_size=args.chunk_size)
        pixels = 0
        for image, store in zip(args.inputs, stores):
            s = ad.detect(image, store, png_tiles=args.png_tiles, geotiff=tuple(args.geotiff),
                          overwrite=args.overwrite, storage_options=options)
            pixels += s["height"] * s["width"]
            print(f"{image} -> {store}: {s['anomalous_fraction']:.3%} anomalous, "
                  f"{s['computed_chunks']}/{s['chunks']} chunks computed, {s['seconds']:.1f} s", flush=True)
        seconds = time.perf_counter() - t0
        print(f"done: {len(stores)} mosaics, {pixels / 1e6:.1f} Mpx, {seconds:.1f} s, "
              f"{pixels / 1e6 / seconds:.2f} Mpx/s overall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
