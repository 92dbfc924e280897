#!/usr/bin/env python
"""Write a synthetic sidescan-sonar mosaic as a tiled GeoTIFF, with its ground truth.

The mosaic comes from :class:`anomaly_dask.datasets.SonarScene`: parallel survey lines with
dark nadir gaps, range fall-off, speckle, sand ripples, sediment patches, ragged no-data
edges, and bright targets casting acoustic shadows. It is rendered and written tile by tile,
so a 20k x 20k (or larger) mosaic never sits in memory whole.

Files written::

    OUT                      the mosaic (uint8 or uint16, GDAL_NODATA tag, EPSG:32631)
    <OUT stem>_truth.tif     ground truth, uint8: 255 on target bodies and shadows, else 0
    PREVIEW (optional)       block-averaged 8-bit PNG preview, longest side <= --preview-size
    <PREVIEW stem>_overlay.png  (with --preview-overlay) the preview with the truth in red

Usage::

    python jobs/make_sonar_mosaic.py --height 20000 --width 20000 --seed 0 \\
        --out mosaic.tif --png-preview mosaic.png --tile 512
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_dask.datasets import SonarScene, write_tiff

__all__ = ["BlockMean", "main", "parse_args"]


class BlockMean:
    """Accumulate a block-averaged preview of an image delivered tile by tile.

    Parameters
    ----------
    height, width : int
        Full image size.
    factor : int
        Block side: each preview pixel is the mean of a ``factor x factor`` block.
    """

    def __init__(self, height: int, width: int, factor: int) -> None:
        self.factor = factor
        shape = (math.ceil(height / factor), math.ceil(width / factor))
        self.total = np.zeros(shape, dtype=np.float64)
        self.count = np.zeros(shape, dtype=np.int64)

    def add(self, y0: int, x0: int, pixels: np.ndarray) -> None:
        """Add the tile whose top-left pixel is ``(y0, x0)``."""
        f = self.factor
        by = np.arange(y0, y0 + pixels.shape[0]) // f
        bx = np.arange(x0, x0 + pixels.shape[1]) // f
        ny, nx = by[-1] - by[0] + 1, bx[-1] - bx[0] + 1
        index = ((by - by[0])[:, None] * nx + (bx - bx[0])[None, :]).ravel()
        sums = np.bincount(index, weights=pixels.ravel().astype(np.float64), minlength=ny * nx)
        counts = np.bincount(index, minlength=ny * nx)
        self.total[by[0] : by[0] + ny, bx[0] : bx[0] + nx] += sums.reshape(ny, nx)
        self.count[by[0] : by[0] + ny, bx[0] : bx[0] + nx] += counts.reshape(ny, nx)

    def mean(self) -> np.ndarray:
        """The preview, float64."""
        return self.total / np.maximum(self.count, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments; defaults to ``sys.argv[1:]``.

    Returns
    -------
    argparse.Namespace
        The options.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=8192, help="mosaic height, pixels (default 8192)")
    p.add_argument("--width", type=int, default=8192, help="mosaic width, pixels (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output GeoTIFF (.tif)")
    p.add_argument("--png-preview", type=Path, default=None, help="optional downsampled PNG preview")
    p.add_argument(
        "--preview-size", type=int, default=2048, help="longest side of the preview (default 2048)"
    )
    p.add_argument("--preview-overlay", action="store_true", help="also write the preview with truth in red")
    p.add_argument("--tile", type=int, default=512, help="TIFF tile side, multiple of 16 (default 512)")
    p.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8", help="pixel type (default uint8)")
    p.add_argument("--nodata", type=int, default=0, help="value outside the swaths (default 0)")
    p.add_argument("--n-objects", type=int, default=None, help="number of targets (default: ~1 per 1.5 Mpx)")
    p.add_argument(
        "--site",
        type=int,
        default=None,
        help="seed of the survey area's ripple regime; give training and test mosaics the same "
        "site and different seeds for lines over one area (default: the seed)",
    )
    p.add_argument("--compression", default="zlib", help="tifffile compression, or 'none' (default zlib)")
    return p.parse_args(argv)


def _to_png(values: np.ndarray, maxval: int) -> np.ndarray:
    """Scale preview values of an integer range to uint8."""
    return np.clip(np.rint(values * (255.0 / maxval)), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    """Generate the mosaic, its truth and the optional preview.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        Process exit status.
    """
    args = parse_args(argv)
    compression = None if args.compression.lower() == "none" else args.compression
    scene = SonarScene(
        args.height,
        args.width,
        args.seed,
        n_objects=args.n_objects,
        dtype=args.dtype,
        nodata=args.nodata,
        site=args.site,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    truth_path = args.out.with_name(f"{args.out.stem}_truth.tif")
    start = time.perf_counter()
    print(f"scene {args.height} x {args.width}, seed {args.seed}: {len(scene.targets)} targets")

    factor = max(1, math.ceil(max(args.height, args.width) / max(1, args.preview_size)))
    image_preview = BlockMean(args.height, args.width, factor) if args.png_preview else None
    truth_preview = (
        BlockMean(args.height, args.width, factor) if args.png_preview and args.preview_overlay else None
    )

    t0 = time.perf_counter()
    on_tile = image_preview.add if image_preview else None
    write_tiff(args.out, scene, args.tile, compression, on_tile=on_tile)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    on_tile = truth_preview.add if truth_preview else None
    write_tiff(truth_path, scene, args.tile, compression, kind="truth", on_tile=on_tile)
    print(f"wrote {truth_path} in {time.perf_counter() - t0:.1f} s")

    if image_preview is not None:
        grey = _to_png(image_preview.mean(), int(np.iinfo(scene.dtype).max))
        args.png_preview.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey).save(args.png_preview)
        print(f"wrote {args.png_preview} ({grey.shape[0]} x {grey.shape[1]}, 1:{factor})")
        if truth_preview is not None:
            rgb = np.repeat(grey[:, :, None], 3, axis=2)
            hit = truth_preview.mean() > 0
            rgb[hit] = (0.4 * rgb[hit] + np.array([153, 0, 0])).astype(np.uint8)
            overlay = args.png_preview.with_name(f"{args.png_preview.stem}_overlay.png")
            Image.fromarray(rgb).save(overlay)
            print(f"wrote {overlay}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
