"""Benchmark: training peak memory does not grow with the amount of training data.

Writes ``--base`` x 2 and x 8 synthetic sonar images (PNG, ``--size`` px a side) to a
temporary folder and trains a detector on each set in a fresh subprocess, printing the
process's peak resident memory and time. Features are streamed chunk by chunk, so the peak
should stay flat while the data grows fourfold.

Usage::

    python jobs/bench_train_memory.py [--size 1536] [--base 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from anomaly_dask.datasets import SonarScene

CHILD = """
import json, resource, sys, time
from anomaly_dask import AnomalyDetector
t0 = time.perf_counter()
ad = AnomalyDetector(random_state=0, verbose=0).train(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "threshold": ad.threshold_}))
"""


def make_images(folder: Path, count: int, size: int, seed0: int) -> None:
    """Write ``count`` anomaly-free sonar scenes as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        scene = SonarScene(size, size, seed=seed0 + k, n_objects=0)
        Image.fromarray(scene.render(0, size, 0, size)).save(folder / f"scene{k:03d}.png")


def main() -> None:
    """Run both trainings and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1536)
    p.add_argument("--base", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "val", 1, args.size, 1000)
        rows = []
        for factor in (2, 8):
            n = args.base * factor
            make_images(root / f"train{factor}", n, args.size, 0)
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(root / f"train{factor}"), str(root / "val")],
                check=True, capture_output=True, text=True,
            )
            stats = json.loads(out.stdout.strip().splitlines()[-1])
            mpx = n * args.size * args.size / 1e6
            rows.append((factor, n, mpx, stats))
            print(
                f"{factor}x data: {n} images, {mpx:.1f} Mpx: peak {stats['peak_mib']:.0f} MiB, "
                f"train {stats['seconds']:.1f} s (wall {time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        (_, _, m2, s2), (_, _, m8, s8) = rows
        print(f"data ratio {m8 / m2:.1f}x -> peak memory ratio {s8['peak_mib'] / s2['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
