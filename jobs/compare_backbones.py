"""Compare backbones and dense settings by pixel AUROC on two kinds of scene.

Scenes: the hieroglyph ``example_dataset`` (cuneiform blocks) and a synthetic sidescan-sonar
mosaic (targets with shadows; train, validation and test drawn from different seeds). Prints
a Markdown table (the README's backbone table) with the dense scoring rate of each setting.

Usage::

    python jobs/compare_backbones.py [--sonar-size 2048] [--configs default]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomaly_dask import AnomalyDetector, WeightsNotFoundError
from anomaly_dask.datasets import SonarScene

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "default": [
        dict(backbone="efficientnet_lite0", weights="imagenet", upsample=2, layers=["blocks2", "blocks3"]),
        dict(backbone="efficientnet_lite0", weights="imagenet", upsample=2, layers=["blocks2", "blocks4"]),
        dict(backbone="efficientnet_lite0", weights="imagenet", upsample=1, layers=["blocks2", "blocks3"]),
        dict(backbone="efficientnet_lite0", weights=None, upsample=2, layers=["blocks2", "blocks3"]),
        dict(backbone="resnet18", weights=None, upsample=2, layers=["layer2", "layer3"]),
        dict(backbone="resnet18", weights="imagenet", upsample=2, layers=["layer2", "layer3"]),
    ],
    "clusters": [dict(kmeans_clusters=k) for k in (10, 25, 50, 100, 200)],
}


def example_auroc(ad: AnomalyDetector) -> tuple[float, float]:
    """Pixel AUROC over the example test images, and pixels per second of scoring."""
    d = ROOT / "example_dataset"
    ys, ss, n, t = [], [], 0, 0.0
    for truth in sorted((d / "ground_truth").glob("*.png")):
        t0 = time.perf_counter()
        s = ad.score_image(str(d / "test" / truth.name))
        t += time.perf_counter() - t0
        n += s.size
        ys.append(np.asarray(Image.open(truth)).ravel() > 0)
        ss.append(s.ravel())
    return float(roc_auc_score(np.concatenate(ys), np.concatenate(ss))), n / t


def sonar_set(size: int) -> dict[str, object]:
    """Training, validation and test scenes of a synthetic sonar survey."""
    train = SonarScene(size, size, seed=11, n_objects=0)
    val = SonarScene(size // 2, size, seed=12, n_objects=0)
    test = SonarScene(size, size, seed=13, n_objects=max(6, size * size // 400_000))
    return {
        "train": train.render(0, size, 0, size),
        "val": val.render(0, size // 2, 0, size),
        "test": test.render(0, size, 0, size),
        "truth": test.truth(0, size, 0, size),
    }


def main() -> None:
    """Print the comparison table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sonar-size", type=int, default=2048)
    p.add_argument("--configs", choices=sorted(CONFIGS), default="default")
    args = p.parse_args()
    sonar = sonar_set(args.sonar_size)
    print("| backbone | weights | upsample | layers | k | example AUROC | sonar AUROC | dense px/s |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in CONFIGS[args.configs]:
        kw = {"random_state": 0, "verbose": 0, **cfg}
        try:
            ad = AnomalyDetector(**kw).train(str(ROOT / "example_dataset/train"), str(ROOT / "example_dataset/val"))
        except WeightsNotFoundError:
            print(f"| {cfg.get('backbone')} | {cfg.get('weights')} | - | - | - | not on this machine | - | - |")
            continue
        ex, rate = example_auroc(ad)
        ad2 = AnomalyDetector(**kw).train(sonar["train"], sonar["val"])
        s = ad2.score_image(sonar["test"])
        so = roc_auc_score(sonar["truth"].ravel(), s.ravel())
        full = {**ad.get_params(), **cfg}
        print(
            f"| {full['backbone']} | {full['weights']} | {full['upsample']} | {','.join(ad.backbone_.dense_stages)} "
            f"| {full['kmeans_clusters']} | {ex:.4f} | {so:.4f} | {rate:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
