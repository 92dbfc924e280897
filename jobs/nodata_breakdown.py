"""Where the false positives of a finished sonar benchmark store lie, by distance to no-data.

Reads the ``mask`` of a store written by ``jobs/bench_mosaic.py`` (whole, so for mosaics up
to about 8k a side) and prints, for bands of distance to the nearest no-data pixel, the
share of valid non-target pixels marked anomalous; ``--skip-rows`` leaves out a band of rows
(for example one seabed region the dictionary has not seen) to separate the two effects.

Usage::

    python jobs/nodata_breakdown.py [--store bench_out/mosaic_4096.zarr] [--size 4096]
        [--seed 23] [--skip-rows 3000:3600]
"""

from __future__ import annotations

import argparse

import numpy as np
import zarr
from scipy.ndimage import distance_transform_edt

from anomaly_dask.datasets import SonarScene

BANDS = ((0, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, None))


def main() -> None:
    """Print the marked share of valid, non-target pixels per distance band."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="bench_out/mosaic_4096.zarr")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--skip-rows", default="", help="START:STOP rows left out")
    args = p.parse_args()
    scene = SonarScene(args.size, args.size, seed=args.seed)
    n = args.size
    valid, truth = scene.valid(0, n, 0, n), scene.truth(0, n, 0, n)
    nadir = scene.nadir(0, n, 0, n)
    mask = zarr.open_group(args.store, mode="r")["mask"][:] > 0
    keep = np.ones((n, 1), dtype=bool)
    if args.skip_rows:
        a, b = (int(v) for v in args.skip_rows.split(":"))
        keep[a:b] = False
    dist = distance_transform_edt(valid)
    normal = valid & ~truth & keep
    for lo, hi in BANDS:
        sel = normal & (dist > lo) & (dist <= (hi if hi is not None else np.inf))
        label = f"{lo}-{hi} px" if hi is not None else f"> {lo} px"
        print(f"distance to no-data {label:>10}: marked {mask[sel].mean():.4f} of {int(sel.sum())} px")
    edge = normal & (dist <= 32)
    other = normal & (dist > 32) & ~nadir
    print(f"within 32 px: {mask[edge].mean():.4f}; other seabed (no nadir): {mask[other].mean():.4f}")


if __name__ == "__main__":
    main()
