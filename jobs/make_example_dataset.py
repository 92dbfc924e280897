#!/usr/bin/env python
"""Generate the small synthetic ``example_dataset`` used by ``anomaly_dask``.

A command line around :func:`anomaly_dask.datasets.example.build_example_dataset`, which
renders rows of hieroglyphs on a parchment-like ground, replaces one block of three of the
four test images by cuneiform, and writes a ground-truth mask for every test image::

    train/train1.png .. train4.png
    val/val1.png, val2.png
    test/test1.png .. test4.png        (test4 has no anomaly)
    ground_truth/test1.png .. test4.png

It needs the Debian package ``fonts-noto-core``. With the default seed it regenerates the
committed ``example_dataset/`` byte for byte (on the same platform).

Usage::

    python jobs/make_example_dataset.py [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anomaly_dask.datasets.example import build_example_dataset, missing_fonts

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "example_dataset"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments.

    Parameters
    ----------
    argv : list of str, optional
        Arguments; defaults to ``sys.argv[1:]``.

    Returns
    -------
    argparse.Namespace
        With attributes ``out`` (pathlib.Path) and ``seed`` (int).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the dataset.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        Process exit status: 0 on success, 1 when a font file is missing.
    """
    args = parse_args(argv)
    missing = missing_fonts()
    if missing:
        print(
            "error: font file(s) not found: " + ", ".join(str(f) for f in missing)
            + "\ninstall them with: apt-get install fonts-noto-core",
            file=sys.stderr,
        )
        return 1
    build_example_dataset(args.out, args.seed, log=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
