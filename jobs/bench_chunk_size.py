"""Benchmark: ``detect`` throughput and peak memory against the chunk size, in one run.

A chunk is read with a halo (the backbone's context, the no-data fill's reach and the edge
reach of the scoring), so small chunks spend more of their time on pixels they do not
own; large chunks hold more in memory per task. This script measures the trade-off that
chose the default ``chunk_size``:

1. trains one default model (``random_state=0``) on a ``--size/2 x --size`` synthetic sonar
   mosaic with a ``--size/4 x --size`` validation mosaic (or loads ``--model``);
2. for every size in ``--chunks`` runs, each in a fresh process on the in-process
   LocalCluster ``detect`` starts by itself, one warm-up ``detect`` of a 1024^2 crop (the
   runtime converts the model once) and then a timed ``detect`` at the defaults (quick-look,
   contacts, pyramid) of the ``--size x --size`` test mosaic;
3. prints, per chunk size: seconds, megapixels per second, the rate relative to the
   default chunk size, the network input area per image pixel (the halo overhead, from
   :meth:`anomaly_dask.scoring.Extractor` window arithmetic) and the process's peak
   resident memory.

The model's chunk size only shapes how the work is cut (chunked == unchunked), so one
model serves every size. Ratios in one run are what to read: the machine is shared.

Usage::

    python jobs/bench_chunk_size.py [--size 4096] [--chunks 512,768,1024,1536,2048]
        [--model PATH] [--workdir bench_out_chunks]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def child_detect(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up on a crop, then time one ``detect`` of the whole image (this process is fresh)."""
    import numpy as np

    from anomaly_dask import AnomalyDetector
    from anomaly_dask.io import open_source, read_window

    ad = AnomalyDetector.load(spec["model"], chunk_size=spec["chunk"], verbose=0)
    work = Path(spec["workdir"])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = open_source(spec["image"])
    _, grid = ad._open(spec["image"], ad._settings())
    overhead = halo_overhead(ad._extractor(ad._settings()), grid, spec["chunk"])
    crop = np.ascontiguousarray(read_window(source, 0, 1024, 0, 1024))
    ad.detect(crop, str(work / "warm.zarr"), quicklook=False, contacts=(), pyramid=False)
    t0 = time.perf_counter()
    summary = ad.detect(spec["image"], str(work / "out.zarr"))
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds, "chunks": summary["chunks"], "anomalous_fraction": summary["anomalous_fraction"],
        "input_per_pixel": overhead,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def halo_overhead(extractor: Any, g: Any, chunk: int) -> float:
    """Pixels read for the network (before magnification) per image pixel, over all chunks of grid ``g``."""
    from anomaly_dask.grid import chunk_windows, tiles_covering
    from anomaly_dask.scoring import _axis_window

    lattice, halo = extractor.config.lattice(extractor.backbone), extractor.config.halo(extractor.backbone)
    reach, m = extractor.edge_reach(g), 2 * extractor.mirror + extractor.gain_radius
    area = 0
    for row in chunk_windows(g, chunk):
        for w in row:
            ext = (max(0, w.y0 - reach), min(g.height, w.y1 + reach), max(0, w.x0 - reach), min(g.width, w.x1 + reach))
            rows, cols = tiles_covering(g, ext)
            y0, y1, _ = _axis_window(*rows, g.stride_h, g.tile_h, halo, lattice)
            x0, x1, _ = _axis_window(*cols, g.stride_w, g.tile_w, halo, lattice)
            area += (y1 - y0 + 2 * m) * (x1 - x0 + 2 * m)
    return area / (g.height * g.width)


def main() -> None:
    """Run the benchmark, print the table and the JSON line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="test mosaic side in px (default 4096)")
    p.add_argument("--chunks", default="512,768,1024,1536,2048", help="chunk sizes to time, comma-separated")
    p.add_argument("--model", default=None, help="detect with this model instead of training one")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench_out_chunks")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_detect(json.loads(args.child))))
        return

    from anomaly_dask import AnomalyDetector
    from anomaly_dask.config import DEFAULTS
    from anomaly_dask.datasets import SonarScene, write_tiff

    chunks = [int(c) for c in args.chunks.split(",")]
    default = DEFAULTS["chunk_size"]
    if default not in chunks:
        chunks.append(default)
    n, work = args.size, args.workdir
    work.mkdir(parents=True, exist_ok=True)

    scenes = {"test": (n, n, 3, None), "train": (n // 2, n, 1, 0), "val": (n // 4, n, 2, 0)}
    paths = {name: work / f"{name}_{h}x{w}.tif" for name, (h, w, _, _) in scenes.items()}
    for name, (h, w, seed, n_objects) in scenes.items():  # site 23, as bench_speed.py
        if not paths[name].exists():
            write_tiff(str(paths[name]), SonarScene(h, w, seed=seed, n_objects=n_objects, site=23))
    test = str(paths["test"])
    model = args.model
    if model is None:
        model = str(work / "model.safetensors")
        t0 = time.perf_counter()
        AnomalyDetector(random_state=0, verbose=0).train(str(paths["train"]), str(paths["val"])).save(model)
        print(f"trained in {time.perf_counter() - t0:.1f} s", flush=True)
    results: dict[int, dict[str, Any]] = {}
    for c in sorted(chunks):
        spec = {"model": model, "image": test, "chunk": c, "workdir": str(work / f"chunk{c}")}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"chunk {c} failed (exit {proc.returncode})")
        results[c] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[c]
        print(f"chunk {c}: {r['seconds']:.1f} s, peak {r['peak_mib']:.0f} MiB", flush=True)
    base = n * n / 1e6 / results[default]["seconds"]
    print(f"\n| chunk_size | chunks | seconds | Mpx/s | vs {default} | network input / image px | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for c, r in sorted(results.items()):
        rate = n * n / 1e6 / r["seconds"]
        print(f"| {c} | {r['chunks']} | {r['seconds']:.1f} | {rate:.2f} | {rate / base:.2f} | "
              f"{r['input_per_pixel']:.2f} | {r['peak_mib']:.0f} |")
    print(json.dumps({"size": n, "default": default, "results": {str(k): v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
