"""Benchmark: ``evaluate`` on a sonar mosaic and its ground-truth raster, at two sizes.

Trains on anomaly-free mosaics, then evaluates a ``--small`` and a ``--large`` test mosaic
(tiled GeoTIFFs, the ground truth a second GeoTIFF, both written window by window) each in
a fresh subprocess, and prints the metrics, the time and the process's peak resident
memory. Scores and masks are streamed chunk by chunk into fixed histograms, so the peak
should stay flat while the pixels grow sixteenfold.

``--fast`` trains with random weights at native resolution (``weights=None, upsample=1``):
the memory behaviour is the same and the large mosaic takes a third of the time.

Usage::

    python jobs/bench_evaluate.py [--small 4096] [--large 16384] [--fast] [--workdir bench_eval]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from anomaly_dask import AnomalyDetector
from anomaly_dask.datasets import SonarScene, write_tiff

CHILD = """
import json, resource, sys, time
from anomaly_dask import AnomalyDetector
ad = AnomalyDetector.load(sys.argv[1], verbose=0)
t0 = time.perf_counter()
r = ad.evaluate(sys.argv[2], sys.argv[3], sys.argv[4])
r.pop("images", None)
r["seconds"] = time.perf_counter() - t0
r["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(r, default=str))
"""


def main() -> None:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=4096)
    p.add_argument("--large", type=int, default=16384)
    p.add_argument("--train-size", type=int, default=2048)
    p.add_argument("--fast", action="store_true", help="random weights, upsample=1 (same memory path)")
    p.add_argument("--workdir", type=Path, default=Path("bench_eval"))
    args = p.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    n = args.train_size
    t0 = time.perf_counter()
    write_tiff(str(work / "train.tif"), SonarScene(n, n, seed=21, n_objects=0, site=23))
    write_tiff(str(work / "val.tif"), SonarScene(n // 2, n, seed=22, n_objects=0, site=23))
    kw = {"weights": None, "upsample": 1} if args.fast else {}
    ad = AnomalyDetector(random_state=0, verbose=0, **kw).train(str(work / "train.tif"), str(work / "val.tif"))
    model = str(work / "model.safetensors")
    ad.save(model)
    print(f"trained on {n}x{n} + {n // 2}x{n} in {time.perf_counter() - t0:.0f} s ({'fast' if args.fast else 'defaults'})",
          flush=True)
    peaks = {}
    for size in (args.small, args.large):
        scene = SonarScene(size, size, seed=23, site=23)
        image, truth = work / f"mosaic_{size}.tif", work / f"mosaic_{size}_truth.tif"
        write_tiff(str(image), scene)
        write_tiff(str(truth), scene, kind="truth")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, model, str(image), str(truth), str(work / f"report_{size}")],
            check=True, capture_output=True, text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[size] = r["peak_mib"]
        print(
            f"{size}x{size} ({size * size / 1e6:.0f} Mpx): evaluated in {r['seconds']:.0f} s, peak {r['peak_mib']:.0f} MiB | "
            f"AUROC {r['auroc']:.4f}, AUPRO {r['aupro']:.4f}, F1 {r['f1']:.3f}, normal marked "
            f"{r['normal_marked']:.5f} (promised {r['false_alarm_rate']:g}), regions hit {r['regions_hit']}/"
            f"{r['regions']}, false regions {r['false_regions_per_km2']} per km^2",
            flush=True,
        )
    print(f"pixels x{(args.large / args.small) ** 2:.0f} -> peak memory ratio {peaks[args.large] / peaks[args.small]:.2f}")


if __name__ == "__main__":
    main()
