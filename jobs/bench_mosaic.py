"""Benchmark: a synthetic sonar mosaic from a tiled TIFF to zarr, at two sizes.

Trains on separate anomaly-free mosaics, then runs ``detect`` on a ``--small`` and a
``--large`` test mosaic (tiled GeoTIFFs written window by window), each in a fresh
subprocess, and prints throughput (megapixels/s), peak resident memory, pixel AUROC on the
ground truth (valid pixels; every ``--eval-step``-th pixel on each axis for the large one)
and the false-positive rates inside no-data, in the nadir bands, near swath edges and on
other seabed.

All mosaics are different survey lines (seeds 21, 22, 23) over one survey area: one
``--site``, the ripple regime. ``--cross-site`` gives each mosaic its own ripple regime
instead, so the test mosaics hold ripple orientations that training never saw.

Usage::

    python jobs/bench_mosaic.py [--small 4096] [--large 16384] [--train-size 8192]
        [--site 23 | --cross-site] [--workdir bench_out] [--scheduler ADDR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr
from scipy.ndimage import binary_dilation
from sklearn.metrics import roc_auc_score

from anomaly_dask import AnomalyDetector
from anomaly_dask.datasets import SonarScene, write_tiff

EDGE = 32  # px: the swath-edge band measured apart

CHILD = """
import json, resource, sys, time
from anomaly_dask import AnomalyDetector
ad = AnomalyDetector.load(sys.argv[1], verbose=0)
if len(sys.argv) > 4 and sys.argv[4]:
    from distributed import Client
    ad.client = Client(sys.argv[4])
summary = ad.detect(sys.argv[2], sys.argv[3], overwrite=True, quicklook=True)
summary["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(summary))
"""


NARROW = 8.0  # px: nadir gaps narrower than this (full width) are reported apart
SEDIMENTS = ("mud", "sand", "gravel")


def evaluate(scene: SonarScene, store: str, step: int) -> dict[str, float]:
    """AUROC and false-positive rates of a finished store, read band by band.

    Rates: inside no-data, in the nadir bands (also split by gap width and by sediment),
    within :data:`EDGE` px of swath edges and on other seabed (also by sediment).
    """
    g = zarr.open_group(store, mode="r")
    scores, truths = [], []
    fp: dict[str, list[int]] = {}

    def count(name: str, m: np.ndarray, sel: np.ndarray) -> None:
        acc = fp.setdefault(name, [0, 0])
        acc[0] += int(m[sel].sum())
        acc[1] += int(sel.sum())

    band, margin = 2048, EDGE
    for y0 in range(0, scene.height, band):
        y1 = min(scene.height, y0 + band)
        sc = g["score"][y0:y1, :]
        m = g["mask"][y0:y1, :] > 0
        truth = scene.truth(y0, y1, 0, scene.width)
        valid = scene.valid(y0, y1, 0, scene.width)
        # valid pixels within EDGE px of no-data (read with a margin so bands join up)
        ya, yb = max(0, y0 - margin), min(scene.height, y1 + margin)
        wide = binary_dilation(~scene.valid(ya, yb, 0, scene.width), iterations=margin)
        edge = wide[y0 - ya : y0 - ya + (y1 - y0)] & valid & ~truth
        nadir = scene.nadir(y0, y1, 0, scene.width) & valid & ~truth & ~edge
        normal = valid & ~truth & ~nadir & ~edge
        narrow = scene.nadir_gap_width(y0, y1, 0, scene.width) < NARROW
        sediment = scene.sediment(y0, y1, 0, scene.width)
        for name, sel in (("nodata", ~valid), ("nadir", nadir), ("swath_edge", edge), ("normal_seabed", normal)):
            count(name, m, sel)
        count("nadir_narrow", m, nadir & narrow)
        count("nadir_wide", m, nadir & ~narrow)
        for k, sed in enumerate(SEDIMENTS):
            count(f"nadir_{sed}", m, nadir & (sediment == k))
            count(f"seabed_{sed}", m, normal & (sediment == k))
        s, t, v = sc[::step, ::step], truth[::step, ::step], valid[::step, ::step]
        scores.append(s[v])
        truths.append(t[v])
    y, s = np.concatenate(truths), np.concatenate(scores)
    out = {"auroc": float(roc_auc_score(y, s)) if y.any() else float("nan")}
    out.update({f"fpr_{k}": a / n if n else float("nan") for k, (a, n) in fp.items()})
    out.update({f"share_{k}": n / max(1, fp["nadir"][1]) for k, (_, n) in fp.items() if k.startswith("nadir_")})
    return out


def breakdown(q: dict[str, float]) -> str:
    """One line: nadir rates by gap width and by sediment, seabed rates by sediment."""
    seds = ", ".join(
        f"{sed} {q[f'fpr_nadir_{sed}']:.4f} ({q[f'share_nadir_{sed}']:.0%} of nadir) / {q[f'fpr_seabed_{sed}']:.4f}"
        for sed in SEDIMENTS
    ).replace("nan", "-")
    return (
        f"  nadir gaps under {NARROW:.0f} px wide {q['fpr_nadir_narrow']:.4f} ({q['share_nadir_narrow']:.0%} of nadir), "
        f"wider {q['fpr_nadir_wide']:.4f}; nadir / other seabed by sediment: {seds}"
    )


def main() -> None:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=4096)
    p.add_argument("--large", type=int, default=16384)
    p.add_argument("--workdir", type=Path, default=Path("bench_out"))
    p.add_argument("--eval-step", type=int, default=4)
    p.add_argument("--train-size", type=int, default=8192, help="training mosaic side (validation: half as tall)")
    p.add_argument("--site", type=int, default=23, help="ripple regime shared by all mosaics (default 23)")
    p.add_argument("--cross-site", action="store_true", help="give every mosaic its own ripple regime")
    p.add_argument("--scheduler", default="")
    p.add_argument("--evaluate-only", action="store_true", help="only re-read finished stores in --workdir")
    args = p.parse_args()
    site = None if args.cross_site else args.site
    if args.evaluate_only:
        for size in (args.small, args.large):
            q = evaluate(SonarScene(size, size, seed=23, site=site), str(args.workdir / f"mosaic_{size}.zarr"),
                         1 if size <= 4096 else args.eval_step)
            print(size, {k: round(v, 4) for k, v in q.items() if not k.startswith("share")})
            print(breakdown(q))
        return
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n = args.train_size
    write_tiff(str(work / "train.tif"), SonarScene(n, n, seed=21, n_objects=0, site=site))
    write_tiff(str(work / "val.tif"), SonarScene(n // 2, n, seed=22, n_objects=0, site=site))
    ad = AnomalyDetector(random_state=0, verbose=0).train(str(work / "train.tif"), str(work / "val.tif"))
    model = str(work / "model.safetensors")
    ad.save(model)
    print(f"trained on {n}x{n} + {n // 2}x{n} mosaics in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {}
    for size in (args.small, args.large):
        scene = SonarScene(size, size, seed=23, site=site)
        tif = work / f"mosaic_{size}.tif"
        t1 = time.perf_counter()
        write_tiff(str(tif), scene)
        gen = time.perf_counter() - t1
        store = str(work / f"mosaic_{size}.zarr")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, model, str(tif), store, args.scheduler],
            check=True, capture_output=True, text=True,
        )
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        quality = evaluate(scene, store, 1 if size <= 4096 else args.eval_step)
        results[size] = summary
        print(
            f"{size}x{size} ({size * size / 1e6:.0f} Mpx, {len(scene.targets)} targets; TIFF written in {gen:.0f} s): "
            f"{summary['megapixels_per_second']:.2f} Mpx/s, {summary['seconds']:.0f} s, "
            f"peak {summary['peak_mib']:.0f} MiB | AUROC {quality['auroc']:.4f}, "
            f"FPR no-data {quality['fpr_nodata']:.4f}, nadir {quality['fpr_nadir']:.4f}, "
            f"swath edges {quality['fpr_swath_edge']:.4f}, "
            f"other seabed {quality['fpr_normal_seabed']:.4f}",
            flush=True,
        )
        print(breakdown(quality), flush=True)
    a, b = results[args.small]["peak_mib"], results[args.large]["peak_mib"]
    print(f"pixels x{(args.large / args.small) ** 2:.0f} -> peak memory ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
