"""Check that two versions of anomaly_dask give the same masks and scores.

Run once per version (e.g. before and after a refactoring, each from its own checkout on
``PYTHONPATH``) with ``--save DIR``: it trains ``AnomalyDetector(random_state=0)`` on the
example dataset and on every case in ``../shared/real-cases/``, scores each test image and
saves the scores and the threshold. Then ``--compare A B`` prints, per image, the largest
score difference relative to the image's score range and the number of mask pixels that
differ, and exits 1 if any mask differs or any difference exceeds ``--tolerance``.

Also compares runtimes of one version: ``--save DIR --runtime torch`` and ``--runtime
openvino``, then ``--compare``.

Only the public API is used (``train``, ``score_image``, ``threshold_``), so the script
runs unchanged against older versions.

Examples
--------
PYTHONPATH=/tmp/old python jobs/compare_layouts.py --save /tmp/cmp/old
PYTHONPATH=. python jobs/compare_layouts.py --save /tmp/cmp/new
python jobs/compare_layouts.py --compare /tmp/cmp/old /tmp/cmp/new
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def cases(real: Path) -> dict[str, Path]:
    """Case name -> folder with ``train/``, ``val/``, ``test/``."""
    out = {"example": ROOT / "example_dataset"}
    if real.is_dir():
        for folder in sorted(p for p in real.iterdir() if (p / "train").is_dir() and (p / "test").is_dir()):
            out[folder.name] = folder
    return out


def save(out: Path, real: Path, runtime: str | None = None) -> None:
    """Train and score every case with the anomaly_dask found on ``sys.path`` (with the
    given ``runtime``, or the version's default)."""
    import anomaly_dask
    from anomaly_dask import AnomalyDetector

    out.mkdir(parents=True, exist_ok=True)
    meta = {"anomaly_dask": str(Path(anomaly_dask.__file__).parent), "cases": {}}
    for name, folder in cases(real).items():
        t0 = time.perf_counter()
        extra = {} if runtime is None else {"runtime": runtime}
        det = AnomalyDetector(random_state=0, verbose=0, **extra).train(str(folder / "train"), str(folder / "val"))
        images = sorted(p for p in (folder / "test").iterdir() if p.suffix.lower() in SUFFIXES)
        arrays = {p.stem: np.asarray(det.score_image(str(p)), dtype=np.float32) for p in images}
        np.savez_compressed(out / f"{name}.npz", **arrays)
        meta["cases"][name] = {"threshold": float(det.threshold_), "images": sorted(arrays),
                               "seconds": time.perf_counter() - t0}
        print(f"{name}: {len(arrays)} images, threshold {det.threshold_:.6f}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def compare(a: Path, b: Path, tolerance: float) -> int:
    """Print per-image differences of two saved runs; 0 when they agree."""
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    print(f"A: {ma['anomaly_dask']}\nB: {mb['anomaly_dask']}")
    print("| case | image | max abs diff / score range | mask pixels differing | of pixels |")
    print("|---|---|---|---|---|")
    bad = 0
    for name in sorted(set(ma["cases"]) | set(mb["cases"])):
        if name not in ma["cases"] or name not in mb["cases"]:
            print(f"| {name} | (missing in one run) | | | |")
            bad += 1
            continue
        ta, tb = ma["cases"][name]["threshold"], mb["cases"][name]["threshold"]
        if ta != tb:
            print(f"| {name} | threshold {ta} vs {tb} | | | |")
            bad += 1
        sa, sb = np.load(a / f"{name}.npz"), np.load(b / f"{name}.npz")
        for key in sorted(set(sa.files) | set(sb.files)):
            x, y = sa[key], sb[key]
            both = np.isfinite(x) & np.isfinite(y)
            span = float(np.nanmax(x) - np.nanmin(x)) or 1.0
            rel = float(np.abs(x[both] - y[both]).max()) / span if both.any() else 0.0
            nan_differs = int((np.isfinite(x) != np.isfinite(y)).sum())
            masks = int(((x >= ta) != (y >= tb)).sum()) + nan_differs
            print(f"| {name} | {key} | {rel:.2e} | {masks} | {x.size} |")
            bad += int(masks > 0 or rel > tolerance)
    print("agree" if not bad else f"{bad} differences beyond tolerance {tolerance:g}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--save DIR`` or ``--compare A B``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", type=Path, help="train, score and save into this folder")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"), help="compare two saved runs")
    parser.add_argument("--real-cases", type=Path, default=ROOT.parent / "shared" / "real-cases")
    parser.add_argument("--runtime", help="with --save: the trunk's runtime (torch, openvino; versions that have it)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest score difference / range")
    args = parser.parse_args(argv)
    if args.save:
        save(args.save, args.real_cases, args.runtime)
        return 0
    if args.compare:
        return compare(*args.compare, args.tolerance)
    parser.error("give --save DIR or --compare A B")
    return 2


if __name__ == "__main__":
    sys.exit(main())
