"""Benchmark: the contact list of a large score store, and the memory it takes.

Builds a ``--size`` x ``--size`` output store (zarr on local disk, chunks of ``--chunk``)
whose scores are low noise plus ``--blobs`` synthetic blobs (discs and ellipses, a share of
them centred on chunk borders and corners so that they cross them) and a no-data stripe.
The scores are generated chunk by chunk from the blob list, so no process ever holds the
whole image. Then, in a fresh subprocess, :func:`anomaly_dask.contacts.contacts_from_store`
lists the contacts, and the script prints the wall time, the number of contacts and the
growth of the peak resident memory during that pass, next to the size of the full boolean
mask (what labelling the whole image at once would need at the very least).

Usage::

    python jobs/bench_contacts.py [--size 16384] [--chunk 1024] [--blobs 3000] [--check] [--workdir DIR]

``--check`` also labels the whole mask at once after the measured pass and compares the
regions' count and areas (for small sizes: it holds the whole image).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from anomaly_dask.store import OutputStore

THRESHOLD = 2.0

CHILD = """
import json, resource, sys, time
import numpy as np
from anomaly_dask.contacts import contacts_from_store
from anomaly_dask.store import OutputStore
store = OutputStore.open(sys.argv[1])
with open("/proc/self/status") as f:
    rss0 = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))  # KiB
t0 = time.perf_counter()
contacts = contacts_from_store(store)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
areas = [c["area_px"] for c in contacts]
crossing = sum(
    (c["bbox_y0"] // store.chunk != (c["bbox_y1"] - 1) // store.chunk)
    or (c["bbox_x0"] // store.chunk != (c["bbox_x1"] - 1) // store.chunk)
    for c in contacts
)
check = None
if sys.argv[2] == "check":  # after the measurement: label the whole mask at once, compare
    from scipy import ndimage
    score = store.read("score")[:]
    with np.errstate(invalid="ignore"):
        labels, n = ndimage.label(np.isfinite(score) & (score >= store.attrs["threshold"]), np.ones((3, 3)))
    sizes = np.sort(np.bincount(labels.ravel())[1:])
    check = bool(n == len(contacts) and np.array_equal(sizes, np.sort(areas)))
print(json.dumps({
    "check": check, "seconds": seconds, "contacts": len(contacts), "crossing_chunks": int(crossing),
    "anomalous_px": int(sum(areas)), "largest_px": max(areas, default=0),
    "rss_before_mib": rss0 / 1024, "peak_rss_mib": peak / 1024, "growth_mib": (peak - rss0) / 1024,
}))
"""


def make_blobs(size: int, chunk: int, n: int, seed: int) -> np.ndarray:
    """Blob table: centre row, centre column, semi-axes (rows, columns), peak score."""
    rng = np.random.default_rng(seed)
    cy = rng.uniform(0, size, n)
    cx = rng.uniform(0, size, n)
    on_border = rng.random(n) < 0.3  # a share centred on a chunk border or corner
    grid = size // chunk
    cy[on_border] = rng.integers(1, grid, on_border.sum()) * chunk + rng.uniform(-2, 2, on_border.sum())
    corner = on_border & (rng.random(n) < 0.5)
    cx[corner] = rng.integers(1, grid, corner.sum()) * chunk + rng.uniform(-2, 2, corner.sum())
    ry = rng.uniform(2, 30, n)
    rx = ry * rng.uniform(0.4, 2.5, n)
    peak = rng.uniform(THRESHOLD + 0.5, 8.0, n)
    return np.stack([cy, cx, ry, rx, peak], axis=1)


def chunk_scores(blobs: np.ndarray, y0: int, y1: int, x0: int, x1: int, seed: int) -> np.ndarray:
    """Scores of one chunk: quantised noise below the threshold, the blobs, a no-data stripe."""
    rng = np.random.default_rng([seed, y0, x0])
    s = np.round(rng.uniform(0.0, THRESHOLD - 0.25, (y1 - y0, x1 - x0)) * 8) / 8
    s = s.astype(np.float32)
    near = (
        (blobs[:, 0] + blobs[:, 2] >= y0) & (blobs[:, 0] - blobs[:, 2] < y1)
        & (blobs[:, 1] + blobs[:, 3] >= x0) & (blobs[:, 1] - blobs[:, 3] < x1)
    )  # fmt: skip
    for cy, cx, ry, rx, peak in blobs[near]:
        by0, by1 = max(y0, int(cy - ry)), min(y1, int(cy + ry) + 1)
        bx0, bx1 = max(x0, int(cx - rx)), min(x1, int(cx + rx) + 1)
        yy, xx = np.ogrid[by0:by1, bx0:bx1]
        d = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2
        blob = np.where(d <= 1.0, THRESHOLD + (peak - THRESHOLD) * (1.0 - d), 0.0).astype(np.float32)
        view = s[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0]
        np.maximum(view, blob, out=view)
    # no data: a stripe of NaN through the top of the image
    sy0, sy1, sx0, sx1 = 0, 3000, 5000, 5100
    if y0 < sy1 and x0 < sx1 and x1 > sx0:
        s[max(sy0, y0) - y0 : min(sy1, y1) - y0, max(sx0, x0) - x0 : min(sx1, x1) - x0] = np.nan
    return s


def build_store(url: Path, size: int, chunk: int, n_blobs: int, seed: int) -> OutputStore:
    """Write the synthetic score store chunk by chunk (mask from the threshold, blank overlay)."""
    blobs = make_blobs(size, chunk, n_blobs, seed)
    store = OutputStore.create(
        url, size, size, chunk, "bench-contacts", {"threshold": THRESHOLD, "input": "synthetic"}
    )
    overlay = np.zeros((chunk, chunk, 3), np.uint8)
    for iy, ix in store.all_chunks():
        y0, y1, x0, x1 = store.chunk_bounds(iy, ix)
        s = chunk_scores(blobs, y0, y1, x0, x1, seed)
        with np.errstate(invalid="ignore"):
            mask = s >= THRESHOLD
        store.write_chunk(iy, ix, s, mask, overlay[: y1 - y0, : x1 - x0])
    store.finalize({"blobs": n_blobs})
    return store


def main() -> None:
    """Build the store, list its contacts in a fresh process, print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--blobs", type=int, default=3000)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument(
        "--check", action="store_true", help="also compare with labelling the whole mask (small sizes)"
    )
    p.add_argument("--workdir", type=Path, default=None, help="kept when given; else a temporary folder")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_contacts_"))
    work.mkdir(parents=True, exist_ok=True)
    url = work / "scores.zarr"
    try:
        t0 = time.perf_counter()
        if url.exists():
            shutil.rmtree(url)
        build_store(url, args.size, args.chunk, args.blobs, args.seed)
        print(f"store: {args.size} x {args.size} px, chunk {args.chunk}, {args.blobs} blobs, "
              f"written in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(url), "check" if args.check else "-"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        mask_mib = args.size * args.size / 2**20  # one byte per pixel, as a numpy bool mask
        print(f"contact pass: {r['seconds']:.1f} s wall, {r['contacts']} contacts "
              f"({r['crossing_chunks']} crossing chunk borders, {r['anomalous_px']} anomalous px, "
              f"largest {r['largest_px']} px)")  # fmt: skip
        if r["check"] is not None:
            print(f"same regions as labelling the whole mask at once: {r['check']}")
        print(f"memory: RSS {r['rss_before_mib']:.0f} MiB before, peak {r['peak_rss_mib']:.0f} MiB, "
              f"growth {r['growth_mib']:.0f} MiB; the full boolean mask alone is {mask_mib:.0f} MiB "
              f"(int32 labels of the whole image: {4 * mask_mib:.0f} MiB)")  # fmt: skip
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
