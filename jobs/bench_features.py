"""Benchmark: pixels per second of ``dense`` and ``patch`` features on the same image.

Both detectors score the same test image end to end (read, features, dictionary, pixel
scores); only the feature mode differs. The patch-mode detector is trained on a small crop:
training speed is not measured here. Prints both rates and their ratio from one run.

Usage::

    python jobs/bench_features.py [--image PATH] [--backbones resnet18,efficientnet_lite0]

Speed does not depend on the weights' values, so a backbone whose pretrained weights are not
on this machine is timed with random weights (said in the output).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_dask import AnomalyDetector, WeightsNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def rate(ad: AnomalyDetector, image: np.ndarray) -> tuple[float, float]:
    """Pixels per second and seconds for one ``score_image`` call (after a warm-up)."""
    ad.score_image(image[:64, :64])
    t0 = time.perf_counter()
    ad.score_image(image)
    dt = time.perf_counter() - t0
    return image.shape[0] * image.shape[1] / dt, dt


def main() -> None:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, default=ROOT / "example_dataset/test/test1.png")
    p.add_argument("--train", type=Path, default=ROOT / "example_dataset/train/train1.png")
    p.add_argument("--backbones", default="resnet18,efficientnet_lite0")
    p.add_argument("--patch-crop", type=int, default=192, help="patch mode scores this crop of the image")
    p.add_argument("--mirror", type=int, default=1, help="1: score a 2x2 mirrored mosaic of the image (default)")
    args = p.parse_args()
    image = np.asarray(Image.open(args.image).convert("RGB"))
    if args.mirror:  # a 2x2 mirrored mosaic: a larger image, so the halo weighs less
        image = np.concatenate([np.concatenate([image, image[:, ::-1]], 1), np.concatenate([image[::-1], image[::-1, ::-1]], 1)], 0)
    train = np.asarray(Image.open(args.train).convert("RGB"))
    crop = image[: args.patch_crop, : args.patch_crop]
    print(f"image {args.image.name} as {image.shape[1]}x{image.shape[0]}; patch mode on its top-left {crop.shape[1]}x{crop.shape[0]}")
    for backbone in args.backbones.split(","):
        common = dict(backbone=backbone, random_state=0, verbose=0, kmeans_clusters=10)
        try:
            AnomalyDetector(**common).train(train[:64, :128], train[64:128, :128])
        except WeightsNotFoundError:
            common["weights"] = None
        patch = AnomalyDetector(features="patch", **common).train(train[:64, :128], train[64:128, :128])
        p_rate, p_s = rate(patch, crop)
        print(f"{backbone} (weights={patch.weights_id_}):")
        print(f"  patch:             {p_rate:10.0f} px/s ({p_s:.2f} s, each tile resized to {patch.patch_size} px)")
        for upsample in (2, 1):
            dense = AnomalyDetector(upsample=upsample, **common).train(train[:256], train[256:])
            d_rate, d_s = rate(dense, image)
            print(
                f"  dense upsample={upsample}: {d_rate:10.0f} px/s ({d_s:.2f} s, layers "
                f"{','.join(dense.backbone_.dense_stages)}) -> {d_rate / p_rate:.0f}x patch",
                flush=True,
            )


if __name__ == "__main__":
    main()
