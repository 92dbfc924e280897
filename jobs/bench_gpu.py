"""GPU check: masks and throughput of ``device="cuda"`` against ``device="cpu"``, in one run.

For a machine with an NVIDIA GPU. Exits with status 2 and a message at once when torch
sees no CUDA device. Steps, each printed as it finishes:

1. **Example dataset** (``example_dataset/``): a default model is trained on its
   ``train/`` and ``val/`` images (or loaded with ``--example-model``); every test image is
   scored with ``score_image`` on ``cuda`` (runtime torch) and on ``cpu`` (runtime
   ``--cpu-runtime``, default ``auto``: OpenVINO when installed). Masks are
   ``score >= threshold_``.
2. **Synthetic sonar**: a default model is trained on a 2048 x 2048 mosaic with a
   1024 x 2048 validation mosaic (or loaded with ``--model``); a ``--size`` x ``--size``
   mosaic (default 4096) is run through ``detect`` (defaults: quick-look, contacts,
   pyramid) on ``cuda``, and a ``--cpu-crop`` x ``--cpu-crop`` crop of it (default 1024,
   the part holding the most targets; written as its own GeoTIFF with the same no-data
   tag) on ``cuda`` and on ``cpu``. Masks are compared on the crop, where both devices
   scored the same input; ``--cpu-crop 0`` runs the CPU on the whole mosaic instead and
   compares the whole mosaic.

For each comparison it prints the share of mask pixels that differ, the largest score
difference (finite scores), and the throughput (px/s) of each device; each device first
scores a small warm-up input (CUDA context, OpenVINO conversion), which is not timed.
``--half`` asks for float16 autocast: the scoring code path has none (the trunk runs in
float32 on every device), so it is reported as not implemented and nothing else changes.
Models are trained with ``--train-device`` (default ``cuda``; the comparison uses one model
for both devices, so where it was trained does not matter for it).

Usage (needs the project installed with a CUDA build of torch; expected to take a few
minutes on one H200, well under ``timeout 480``, but not yet measured on one)::

    python jobs/bench_gpu.py [--workdir bench_out_gpu] [--model PATH] [--example-model PATH]
        [--size 4096] [--cpu-crop 1024] [--cpu-runtime auto] [--train-device cuda] [--half]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Exit status when no CUDA device is available.
NO_CUDA = 2


def require_cuda(device: str = "cuda") -> str:
    """Name of the CUDA ``device``; exit with :data:`NO_CUDA` and a message when there is none."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        print(
            f"bench_gpu: CUDA is not available here (torch {torch.__version__}, built for CUDA {built}, "
            f"{torch.cuda.device_count()} device(s)); run this on a machine with an NVIDIA GPU and a CUDA "
            "build of torch",
            file=sys.stderr,
        )
        raise SystemExit(NO_CUDA)
    return torch.cuda.get_device_name(torch.device(device))


def compare(mask_gpu: Any, mask_cpu: Any, score_gpu: Any, score_cpu: Any) -> dict[str, Any]:
    """Share of differing mask pixels and the largest difference of scores finite on both."""
    import numpy as np

    differ = mask_gpu != mask_cpu
    both = np.isfinite(score_gpu) & np.isfinite(score_cpu)
    return {
        "pixels": int(differ.size),
        "differing": int(differ.sum()),
        "differing_share": float(differ.mean()),
        "marked_gpu": float(mask_gpu.mean()),
        "marked_cpu": float(mask_cpu.mean()),
        "max_score_diff": float(np.abs(score_gpu[both] - score_cpu[both]).max()) if both.any() else 0.0,
        "nan_mismatch": int((np.isfinite(score_gpu) != np.isfinite(score_cpu)).sum()),
    }


def example_dataset(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train (or load) a model on ``example_dataset/`` and compare devices on its test images."""
    import numpy as np
    from PIL import Image

    from anomaly_dask import AnomalyDetector

    d = args.dataset
    path = args.example_model
    out: dict[str, Any] = {}
    if path is None:
        path = str(work / "example_model.safetensors")
        t0 = time.perf_counter()
        AnomalyDetector(random_state=0, verbose=0, device=args.train_device).train(
            str(d / "train"), str(d / "val")
        ).save(path)
        out["train_seconds"] = time.perf_counter() - t0
    images = sorted((d / "test").glob("*.png"))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    scores: dict[str, list[Any]] = {}
    for role, device, runtime in (("gpu", args.device, "torch"), ("cpu", "cpu", args.cpu_runtime)):
        ad = AnomalyDetector.load(path, device=device, runtime=runtime, verbose=0)
        ad.score_image(arrays[0][:128, :128])  # warm-up
        t0 = time.perf_counter()
        scores[role] = [ad.score_image(a) for a in arrays]
        seconds = time.perf_counter() - t0
        out[role] = {"runtime": ad._feature_config(ad._settings()).runtime, "seconds": seconds,
                       "px_per_s": sum(a.shape[0] * a.shape[1] for a in arrays) / seconds}
        threshold = ad.threshold_
    per_image = []
    for p, g, c in zip(images, scores["gpu"], scores["cpu"]):
        mg, mc = np.isfinite(g) & (g >= threshold), np.isfinite(c) & (c >= threshold)
        per_image.append({"image": p.name, **compare(mg, mc, g, c)})
    n = sum(r["pixels"] for r in per_image)
    out["images"] = per_image
    out["differing_share"] = sum(r["differing"] for r in per_image) / n
    out["max_score_diff"] = max(r["max_score_diff"] for r in per_image)
    return out


def _detect(model: str, device: str, runtime: str, image: str, run_dir: Path, warm: str) -> dict[str, Any]:
    """Warm up on ``warm``, then time one ``detect`` of ``image`` into a fresh store in ``run_dir``."""
    from anomaly_dask import AnomalyDetector

    ad = AnomalyDetector.load(model, device=device, runtime=runtime, verbose=0)
    warm_dir = run_dir.with_name(run_dir.name + "_warmup")
    for folder in (warm_dir, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    ad.detect(warm, str(warm_dir / "out.zarr"))
    t0 = time.perf_counter()
    summary = ad.detect(image, str(run_dir / "out.zarr"))
    seconds = time.perf_counter() - t0
    return {
        "runtime": ad._feature_config(ad._settings()).runtime, "seconds": seconds,
        "scoring_seconds": summary["seconds"], "px_per_s": summary["height"] * summary["width"] / seconds,
        "store": str(run_dir / "out.zarr"), "contacts": summary.get("contacts"),
    }


def sonar(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train (or load) a sonar model; detect the mosaic on cuda, its crop on cuda and cpu."""
    import numpy as np
    import tifffile
    import zarr

    from anomaly_dask import AnomalyDetector
    from anomaly_dask.datasets import SonarScene, write_tiff

    out: dict[str, Any] = {}
    n = args.size
    scene = SonarScene(n, n, seed=23, site=23)
    mosaic = work / f"sonar_{n}.tif"
    t0 = time.perf_counter()
    if not mosaic.exists():
        write_tiff(str(mosaic), scene)
    model = args.model
    if model is None:
        train, val = work / "sonar_train_2048.tif", work / "sonar_val_1024x2048.tif"
        if not train.exists():
            write_tiff(str(train), SonarScene(2048, 2048, seed=21, n_objects=0, site=23))
        if not val.exists():
            write_tiff(str(val), SonarScene(1024, 2048, seed=22, n_objects=0, site=23))
        out["mosaics_seconds"] = time.perf_counter() - t0
        model = str(work / "sonar_model.safetensors")
        t0 = time.perf_counter()
        AnomalyDetector(random_state=0, verbose=0, device=args.train_device).train(str(train), str(val)).save(model)
        out["train_seconds"] = time.perf_counter() - t0
        print(f"sonar model trained on 2048x2048 + 1024x2048 ({args.train_device}) in {out['train_seconds']:.0f} s",
              flush=True)
    pixels = tifffile.imread(str(mosaic))
    warm = work / "sonar_warmup.tif"
    tags = [(42113, "s", 0, str(int(scene.nodata)), True)]  # GDAL_NODATA, as write_tiff writes it
    tifffile.imwrite(str(warm), pixels[n // 2 - 128 : n // 2 + 128, n // 4 : n // 4 + 256], extratags=tags)
    c = args.cpu_crop if 0 < args.cpu_crop < n else 0
    if c:  # the crop holding the most target origins, on a grid of crop-sized cells
        counts: dict[tuple[int, int], int] = {}
        for t in scene.targets:
            key = (min(t.y0, n - c) // c, min(t.x0, n - c) // c)
            counts[key] = counts.get(key, 0) + 1
        cy, cx = max(counts, key=counts.get) if counts else (0, 0)
        y0, x0 = cy * c, cx * c
        crop = work / f"sonar_{n}_crop_{c}.tif"
        tifffile.imwrite(str(crop), pixels[y0 : y0 + c, x0 : x0 + c], tile=(256, 256), compression="zlib",
                         extratags=tags)
        out["crop"] = {"y0": y0, "x0": x0, "side": c, "targets": counts.get((cy, cx), 0)}
    full_gpu = _detect(model, args.device, "torch", str(mosaic), work / "gpu_full", str(warm))
    out["gpu_full"] = full_gpu
    print(f"{args.device} detect {n}x{n}: {full_gpu['seconds']:.1f} s = {full_gpu['px_per_s']:,.0f} px/s", flush=True)
    if c:
        gpu = _detect(model, args.device, "torch", str(crop), work / "gpu_crop", str(warm))
        cpu = _detect(model, "cpu", args.cpu_runtime, str(crop), work / "cpu_crop", str(warm))
        out["gpu_crop"], out["cpu_crop"] = gpu, cpu
    else:
        gpu = full_gpu
        cpu = out["cpu_full"] = _detect(model, "cpu", args.cpu_runtime, str(mosaic), work / "cpu_full", str(warm))
    print(f"cpu detect ({cpu['runtime']}): {cpu['seconds']:.1f} s = {cpu['px_per_s']:,.0f} px/s", flush=True)
    g, k = zarr.open_group(gpu["store"], mode="r"), zarr.open_group(cpu["store"], mode="r")
    out["compare"] = compare(np.asarray(g["mask"][:]) > 0, np.asarray(k["mask"][:]) > 0,
                             np.asarray(g["score"][:]), np.asarray(k["score"][:]))
    return out


def print_table(res: dict[str, Any]) -> None:
    """The figures of one run as a plain table."""
    rows: list[tuple[str, str, str]] = []
    ex = res.get("example")
    if ex:
        rows.append((f"example: {res['device']} (torch)", f"{ex['gpu']['px_per_s']:,.0f} px/s",
                     f"{len(ex['images'])} test images in {ex['gpu']['seconds']:.2f} s (score_image)"))
        rows.append((f"example: cpu ({ex['cpu']['runtime']})", f"{ex['cpu']['px_per_s']:,.0f} px/s",
                     f"{ex['cpu']['seconds']:.2f} s"))
        rows.append(("example: masks differing", f"{ex['differing_share']:.2e}",
                     f"share of pixels; max |score diff| {ex['max_score_diff']:.2e}"))
        for r in ex["images"]:
            rows.append((f"  {r['image']}", f"{r['differing_share']:.2e}",
                         f"{r['differing']} px; marked gpu {r['marked_gpu']:.4f} / cpu {r['marked_cpu']:.4f}"))
    so = res.get("sonar")
    if so:
        n = res["size"]
        rows.append((f"sonar {n}^2: {res['device']} (torch)", f"{so['gpu_full']['px_per_s']:,.0f} px/s",
                     f"detect {so['gpu_full']['seconds']:.1f} s (scoring {so['gpu_full']['scoring_seconds']:.1f} s)"))
        where = "whole mosaic"
        if "crop" in so:
            cr = so["crop"]
            where = f"{cr['side']}^2 crop at y={cr['y0']}, x={cr['x0']} ({cr['targets']} targets)"
            rows.append((f"sonar crop: {res['device']} (torch)", f"{so['gpu_crop']['px_per_s']:,.0f} px/s",
                         f"{where}: {so['gpu_crop']['seconds']:.1f} s"))
        cpu = so.get("cpu_crop") or so["cpu_full"]
        rows.append((f"sonar: cpu ({cpu['runtime']})", f"{cpu['px_per_s']:,.0f} px/s",
                     f"{where}: {cpu['seconds']:.1f} s" + (" (CPU run restricted to the crop)" if "crop" in so else "")))
        cmp_ = so["compare"]
        rows.append(("sonar: masks differing", f"{cmp_['differing_share']:.2e}",
                     f"{cmp_['differing']} of {cmp_['pixels']} px ({where}); max |score diff| "
                     f"{cmp_['max_score_diff']:.2e}; marked gpu {cmp_['marked_gpu']:.5f} / cpu {cmp_['marked_cpu']:.5f}"))
    rows.append(("float16 autocast (--half)", res["half"], ""))
    rows.append(("total run", f"{res['total_seconds']:.0f} s", res["gpu"]))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    print()
    print(f"{'what':<{widths[0]}}  {'figure':>{widths[1]}}  note")
    for a, b, c in rows:
        print(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}")


def main() -> None:
    """Check CUDA, run both comparisons, print the table and the JSON line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench_out_gpu")
    p.add_argument("--dataset", type=Path, default=ROOT / "example_dataset")
    p.add_argument("--model", default=None, help="sonar model to load instead of training one")
    p.add_argument("--example-model", default=None, help="example-dataset model to load instead of training one")
    p.add_argument("--size", type=int, default=4096, help="sonar mosaic side in px (default 4096)")
    p.add_argument("--cpu-crop", type=int, default=1024,
                   help="CPU scores this crop of the mosaic (default 1024); 0: the whole mosaic")
    p.add_argument("--cpu-runtime", default="auto", choices=("auto", "torch", "openvino"))
    p.add_argument("--device", default="cuda", help="the CUDA device under test (default cuda)")
    p.add_argument("--train-device", default="cuda", help="device models are trained on (default cuda)")
    p.add_argument("--skip-example", action="store_true")
    p.add_argument("--skip-sonar", action="store_true")
    p.add_argument("--half", action="store_true", help="try float16 autocast (not implemented: reported as such)")
    args = p.parse_args()
    if not args.device.startswith("cuda"):
        p.error(f"--device {args.device}: give a CUDA device (cuda, cuda:<n>); the CPU is always compared")
    gpu = require_cuda(args.device)
    t_start = time.perf_counter()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"GPU: {gpu}", flush=True)
    res: dict[str, Any] = {"gpu": gpu, "device": args.device, "size": args.size}
    res["half"] = "not requested"
    if args.half:
        res["half"] = ("not implemented: anomaly_dask's scoring path has no float16 / autocast option "
                       "(the trunk runs in float32 on every device); float32 figures only")
        print(f"--half: {res['half']}", flush=True)
    if not args.skip_example:
        res["example"] = example_dataset(args, work)
        print(f"example dataset: masks differ on {res['example']['differing_share']:.2e} of pixels", flush=True)
    if not args.skip_sonar:
        res["sonar"] = sonar(args, work)
        print(f"sonar: masks differ on {res['sonar']['compare']['differing_share']:.2e} of pixels", flush=True)
    res["total_seconds"] = time.perf_counter() - t_start
    print_table(res)
    print(json.dumps(res, default=float))


if __name__ == "__main__":
    main()
