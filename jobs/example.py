"""The README example: train, save, load and test on ``example_dataset/``, then score it.

Prints the pixel AUROC and F1 of the test masks against ``example_dataset/ground_truth/``.

Usage::

    python jobs/example.py [--dataset example_dataset] [--scheduler ADDRESS]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomaly_dask import AnomalyDetector

ROOT = Path(__file__).resolve().parents[1]


def evaluate(ad: AnomalyDetector, dataset: Path) -> tuple[float, float]:
    """Pixel AUROC of the scores and F1 of the thresholded masks over all test images."""
    truths, scores, masks = [], [], []
    for truth_path in sorted((dataset / "ground_truth").glob("*.png")):
        image = dataset / "test" / truth_path.name
        s = ad.score_image(str(image))
        truths.append(np.asarray(Image.open(truth_path)).ravel() > 0)
        scores.append(s.ravel())
        masks.append(s.ravel() >= ad.threshold_)
    y, s, m = np.concatenate(truths), np.concatenate(scores), np.concatenate(masks)
    f1 = 2.0 * (m & y).sum() / (m.sum() + y.sum())
    return float(roc_auc_score(y, s)), float(f1)


def main() -> None:
    """Run the example end to end."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT / "example_dataset")
    parser.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    args = parser.parse_args()
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    d = args.dataset
    t0 = time.perf_counter()
    ad = AnomalyDetector(random_state=0, client=client)
    ad.train(str(d / "train"), str(d / "val"))
    ad.save(str(d / "model.safetensors"))
    t1 = time.perf_counter()
    ad = AnomalyDetector.load(str(d / "model.safetensors"), client=client)
    results = ad.test(str(d / "test"), str(d / "output"))
    t2 = time.perf_counter()
    for r in results:
        print(f"{Path(r['path']).name}: {r['anomalous_fraction']:.1%} anomalous, max score "
              f"{r['max_score']:.2f} -> {r['overlay_path']}")
    auroc, f1 = evaluate(ad, d)
    print(f"threshold {ad.threshold_:.3f}; train {t1 - t0:.1f} s, test {t2 - t1:.1f} s")
    print(f"pixel AUROC {auroc:.4f}  F1 {f1:.3f}")


if __name__ == "__main__":
    main()
