"""Benchmark: detect throughput with 1 and with 2 single-threaded worker processes.

Writes one synthetic sonar mosaic (:class:`anomaly_dask.datasets.SonarScene`, tiled
GeoTIFF) and a quickly trained model, then runs ``detect`` on the same mosaic on a
LocalCluster of 1 worker and of 2 workers (processes, 1 task thread each, ``--torch-threads``
torch threads per task), and prints both throughputs and the scaling efficiency
``T2 / (2 * T1)`` (1.0 is perfect, T = megapixels per second). Each cluster first scores a
small warm-up image of 16 chunks (model transfer, first forward pass and, with OpenVINO,
the conversion in every worker) that is not timed.

Usage::

    python jobs/bench_scaling.py [--size 2048] [--chunk-size 512] [--torch-threads 1] [--runtime auto]
        [--workdir bench_scaling]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from anomaly_dask import AnomalyDetector
from anomaly_dask.compute import connect
from anomaly_dask.datasets import SonarScene, write_tiff


def main() -> None:
    """Run both configurations and print throughput and efficiency."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048, help="mosaic side in px")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--weights", default="imagenet", help="imagenet or none (random)")
    p.add_argument("--runtime", default="auto", help="what runs the trunk: auto, torch or openvino")
    p.add_argument("--workdir", type=Path, default=Path("bench_scaling"))
    args = p.parse_args()
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    mosaic, train, warm = wd / "mosaic.tif", wd / "train.tif", wd / "warmup.tif"
    if not warm.exists():
        write_tiff(str(warm), SonarScene(4 * args.chunk_size, 4 * args.chunk_size, seed=9))
    if not mosaic.exists():
        write_tiff(str(mosaic), SonarScene(args.size, args.size, seed=7))
    if not train.exists():
        write_tiff(str(train), SonarScene(1024, 1024, seed=8, n_objects=0))
    weights = None if args.weights == "none" else args.weights
    model = wd / "model.safetensors"
    if not model.exists():
        AnomalyDetector(weights=weights, random_state=0, chunk_size=args.chunk_size, verbose=0).train(
            str(train)
        ).save(str(model))
    rates = {}
    for n in (1, 2):
        out = wd / f"out_{n}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        with connect(workers=n, threads_per_worker=1, torch_threads=args.torch_threads) as client:
            ad = AnomalyDetector.load(str(model), client=client, chunk_size=args.chunk_size, verbose=0,
                                     runtime=args.runtime)
            shutil.rmtree(wd / "warmup.zarr", ignore_errors=True)
            ad.detect(str(warm), str(wd / "warmup.zarr"), quicklook=False, overwrite=True)
            s = ad.detect(str(mosaic), str(out), quicklook=False, overwrite=True)  # its own workdir
        rates[n] = s["megapixels_per_second"]
        print(f"{n} worker(s) x 1 thread ({args.torch_threads} torch threads): {s['chunks']} chunks, "
              f"{s['seconds']:.1f} s, {rates[n]:.3f} Mpx/s", flush=True)
    print(f"efficiency T2 / (2 T1) = {rates[2] / (2 * rates[1]):.2f}")


if __name__ == "__main__":
    main()
